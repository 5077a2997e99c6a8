"""lite.smooth: folding migration scales is exact in fp32, for every architecture in the table.

Folding divides a producer (norm weight, or a linear's output rows) by s and multiplies the
consumer's weight columns by s; in exact arithmetic the model is unchanged, so fp32 logits must agree
to rounding (~1e-7 relative here; we allow 1e-5). Scales are drawn far from 1 so that a wrong fold
(wrong rows, wrong head mapping, Gemma's 1 + w forgotten) moves the logits by far more than that.
"""

import copy
import dataclasses

import pytest
import torch

from helpers import arch_of, blocks_of, logits, relative_difference, tiny_absmax
from lite.smooth import fold_scales_, migration_scales, scale_columns_, smoothing_factors

TOLERANCE = 1e-5  # fp32 folding noise measured at ~3e-7 relative on these models
WRONG = 1e-4  # 10x the tolerance; a mis-fold of one channel moves the logits by more (measured >=1e-3)


def fold(model, scales):
    """A deep copy of `model` with `scales` folded into every block."""
    folded = copy.deepcopy(model)
    for prefix, block in blocks_of(folded).items():
        fold_scales_(block, prefix, arch_of(folded), folded.config, scales)
    return folded


def head_layout(config):
    head_dim = config.head_dim
    num_heads, num_kv = config.num_attention_heads, config.num_key_value_heads
    return num_heads, num_kv, head_dim


def expand_kv(s_kv: torch.Tensor, config) -> torch.Tensor:
    """A factor per V channel `(num_kv * head_dim,)` -> per attention-output channel, written from the
    grouped-query definition (query head h reads KV head h // (num_heads / num_kv)), independently of
    lite.archs.kv_group_index."""
    num_heads, num_kv, head_dim = head_layout(config)
    group = num_heads // num_kv
    return s_kv.view(num_kv, 1, head_dim).expand(num_kv, group, head_dim).reshape(-1)  # (num_heads * head_dim,)


def random_scales(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Log-uniform factors in [0.1, 10] for every smoothing pair, consistent across shared inputs."""
    g = torch.Generator().manual_seed(seed)
    arch, config = arch_of(model), model.config

    def draw(n):
        return 10 ** (torch.rand(n, generator=g) * 2 - 1)

    scales = {}
    for prefix, block in blocks_of(model).items():
        for pair in arch.at(prefix).norm_pairs:
            s = draw(block.get_submodule(pair.linears[0]).in_features)
            scales.update({f"{prefix}.{name}": s for name in pair.linears})
        for pair in arch.at(prefix).linear_pairs:
            consumer = block.get_submodule(pair.consumer)
            if pair.per_kv_head:
                s = expand_kv(draw(config.num_key_value_heads * config.head_dim), config)
            else:
                s = draw(consumer.in_features)
            scales[f"{prefix}.{pair.consumer}"] = s
    return scales


def consumers(model) -> set[str]:
    arch = arch_of(model)
    names = set()
    for prefix in blocks_of(model):
        block_arch = arch.at(prefix)  # dense and MoE blocks of a model mixing them differ
        for pair in block_arch.norm_pairs:  # float readers (MoE routers) get no scale of their own
            names.update(f"{prefix}.{name}" for name in pair.linears if name not in block_arch.keep_float)
        names.update(f"{prefix}.{pair.consumer}" for pair in block_arch.linear_pairs)
    return names


@pytest.mark.parametrize("w_stat", ["absmax", "lmdeploy"])
def test_folding_calibrated_scales_keeps_fp32_logits(model_type, tiny_model, tokens, w_stat):
    scales = migration_scales(blocks_of(tiny_model), arch_of(tiny_model), tiny_model.config,
                              tiny_absmax(model_type), alpha=0.8, w_stat=w_stat)

    assert set(scales) == consumers(tiny_model)
    every = torch.cat(list(scales.values()))
    assert torch.isfinite(every).all() and (every > 0).all()
    assert every.max() / every.min() > 3, "scales this close to 1 would not test the fold"
    folded = fold(tiny_model, scales)

    assert relative_difference(logits(folded, tokens), logits(tiny_model, tokens)) <= TOLERANCE
    # The fold really happened (a no-op would pass the check above): every linear's weight in a block moved,
    # and every norm that feeds linears (not the per-head q/k norms inside attention, which smoothing leaves).
    before, after = dict(tiny_model.named_parameters()), dict(folded.named_parameters())
    checked = 0
    for prefix in blocks_of(tiny_model):
        arch = arch_of(tiny_model).at(prefix)
        touched = {pair.norm for pair in arch.norm_pairs} | {pair.producer for pair in arch.linear_pairs} | \
            {name for pair in arch.norm_pairs for name in pair.linears} | {pair.consumer for pair in arch.linear_pairs}
        for module in touched:
            name = f"{prefix}.{module}.weight"
            assert not torch.allclose(after[name], before[name], rtol=1e-3), f"{name} was not changed by folding"
            checked += 1
    assert checked >= 2 * len(blocks_of(tiny_model))


def test_folding_random_scales_keeps_fp32_logits(tiny_model, tokens):
    """Factors in [0.1, 10] independent of the statistics: the fold alone is under test."""
    folded = fold(tiny_model, random_scales(tiny_model))

    assert relative_difference(logits(folded, tokens), logits(tiny_model, tokens)) <= TOLERANCE


@pytest.mark.parametrize("pair_kind", ["norm", "linear"])
def test_a_mismatched_factor_changes_the_logits(tiny_model, tokens, pair_kind):
    """The check above can fail: multiply one consumer column by 3 without dividing its producer."""
    arch = arch_of(tiny_model).of_block(0)
    if pair_kind == "norm" and not arch.norm_pairs:
        pytest.skip(f"{tiny_model.config.model_type} has no norm feeding a linear")
    folded = fold(tiny_model, random_scales(tiny_model))
    name = arch.norm_pairs[0].linears[0] if pair_kind == "norm" else arch.linear_pairs[0].consumer
    linear = folded.get_submodule(f"model.layers.0.{name}")
    corrupt = torch.ones(linear.in_features)
    corrupt[3] = 3.0
    scale_columns_(linear, corrupt)

    assert relative_difference(logits(folded, tokens), logits(tiny_model, tokens)) > WRONG


def test_gemma_norm_folds_one_plus_w(tiny, tokens):
    """Gemma computes x · (1 + w): folding must give (1 + w') = (1 + w) / s, not w' = w / s."""
    model = tiny("gemma")
    scales = random_scales(model)
    norm = model.get_submodule("model.layers.0.input_layernorm").weight.detach().clone()
    s = scales["model.layers.0.self_attn.q_proj"]

    folded = fold(model, scales)

    folded_norm = folded.get_submodule("model.layers.0.input_layernorm").weight
    torch.testing.assert_close(1 + folded_norm, (1 + norm) / s, rtol=1e-6, atol=1e-6)
    assert relative_difference(logits(folded, tokens), logits(model, tokens)) <= TOLERANCE
    # The same fold with the plain x · w formula breaks the model, so the offset is what keeps it exact.
    wrong = copy.deepcopy(model)
    plain = dataclasses.replace(arch_of(model), norm_offset=0.0)
    for prefix, block in blocks_of(wrong).items():
        fold_scales_(block, prefix, plain, wrong.config, scales)
    assert relative_difference(logits(wrong, tokens), logits(model, tokens)) > WRONG


def test_v_to_o_factors_are_shared_by_the_query_heads_of_a_group(model_type, tiny_model):
    """Under GQA one V channel feeds `group` query heads: its factor is computed once, from the
    largest activation and weight statistic over those heads, and repeated over them."""
    config, arch = tiny_model.config, arch_of(tiny_model)
    absmax = tiny_absmax(model_type)
    scales = migration_scales(blocks_of(tiny_model), arch, config, absmax, alpha=0.5, w_stat="absmax")
    num_heads, num_kv, head_dim = head_layout(config)
    pair = next((p for p in arch.linear_pairs if p.per_kv_head), None)
    if pair is None:
        pytest.skip(f"{model_type}'s attention has no KV heads shared by query heads (latent attention)")
    assert num_kv < num_heads, "the tiny models must use grouped-query attention"

    for prefix in blocks_of(tiny_model):
        consumer = f"{prefix}.{pair.consumer}"
        s = scales[consumer].view(num_kv, num_heads // num_kv, head_dim)  # (kv head, query head in group, channel)
        assert torch.equal(s, s[:, :1].expand_as(s)), "query heads of one group got different factors"
        assert not torch.allclose(s[0], s[1]), "different KV heads should get different factors"
        # The paper's formula on group maxima, computed here without lite's index helpers.
        w = tiny_model.get_submodule(consumer).weight.detach().abs().amax(dim=0)  # (num_heads * head_dim,)
        a_kv = absmax[consumer].view(num_kv, -1, head_dim).amax(dim=1)  # (num_kv, head_dim)
        w_kv = w.view(num_kv, -1, head_dim).amax(dim=1)
        expected = a_kv.sqrt() / w_kv.sqrt()
        torch.testing.assert_close(s[:, 0], expected, rtol=1e-5, atol=0)


def test_phi3_packed_projections_smooth_only_v_and_up_rows(tiny):
    """Folding v -> o and up -> down into Phi-3's packed `qkv_proj` / `gate_up_proj` divides only the
    V rows and the up rows; q, k and gate rows are untouched."""
    model = tiny("phi3")
    config = model.config
    scales = {k: v for k, v in random_scales(model).items() if k.endswith(("o_proj", "down_proj"))}
    qkv = model.get_submodule("model.layers.0.self_attn.qkv_proj").weight.detach().clone()
    gate_up = model.get_submodule("model.layers.0.mlp.gate_up_proj").weight.detach().clone()

    folded = fold(model, scales)

    num_heads, num_kv, head_dim = head_layout(config)
    v_start = (num_heads + num_kv) * head_dim
    new_qkv = folded.get_submodule("model.layers.0.self_attn.qkv_proj").weight
    assert torch.equal(new_qkv[:v_start], qkv[:v_start])
    s_o = scales["model.layers.0.self_attn.o_proj"]
    s_v = s_o.view(num_kv, -1, head_dim)[:, 0].reshape(-1)  # one factor per V channel
    torch.testing.assert_close(new_qkv[v_start:], qkv[v_start:] / s_v[:, None], rtol=1e-6, atol=0)
    inter = config.intermediate_size
    new_gate_up = folded.get_submodule("model.layers.0.mlp.gate_up_proj").weight
    assert torch.equal(new_gate_up[:inter], gate_up[:inter])
    torch.testing.assert_close(new_gate_up[inter:], gate_up[inter:] / scales["model.layers.0.mlp.down_proj"][:, None],
                               rtol=1e-6, atol=0)


def test_alpha_half_balances_activation_and_weight_ranges():
    """Eq. (4) at alpha 0.5: after smoothing, max|X_j| / s_j equals max|W_j| · s_j for every channel."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(32, generator=g) * 50 + 0.1
    w = torch.rand(32, generator=g) + 0.01

    s = smoothing_factors(a, w, alpha=0.5, normalize=False)

    torch.testing.assert_close(a / s, w * s)


def test_lmdeploy_normalization_centres_the_factors():
    """Dividing by sqrt(max(s) · min(s)) makes max(s) · min(s) = 1 and keeps the ratios."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.rand(32, generator=g) * 50 + 0.1, torch.rand(32, generator=g) + 0.01

    raw = smoothing_factors(a, w, alpha=0.5, normalize=False)
    s = smoothing_factors(a, w, alpha=0.5, normalize=True)

    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    torch.testing.assert_close(s / s[0], raw / raw[0])


def test_dead_channels_do_not_give_zero_or_infinite_factors():
    s = smoothing_factors(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), alpha=0.5, normalize=True)

    assert torch.isfinite(s).all() and (s > 0).all()
