"""Mixture-of-Experts (issue 11): experts as one linear each, every expert calibrated on every token while
the outputs keep the model's routing, per-expert checkpoint names, float routers, and the fit check.

Expected values come from transformers' own fused-expert model (hooks on its forward, its routers'
choices), not from `lite.moe`.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import fused_model, lite_error, logits, random_tokens
from lite.archs import ARCHS, arch_for
from lite.cli.main import main
from lite.errors import LiteError
from lite.model import build_tiny, byte_tokenizer, tiny_config
from lite.moe import Experts
from lite.smooth import check_folding_fits
from lite.shards import ShardReader
from lite.source import Loaded, open_streamed
from lite.steps.stats import Statistics
from lite.sweep import sweep

MOE_TYPES = sorted(t for t, arch in ARCHS.items() if arch.experts is not None)
CALIB = ["--calib-dataset", "sample", "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]


def first_moe_block(model_type: str) -> int:
    """The first block with experts (DeepSeek's first blocks are dense)."""
    config = tiny_config(model_type)
    return min(set(range(config.num_hidden_layers)) - arch_for(config).dense_blocks)


def save_fused(folder, model_type: str) -> torch.nn.Module:
    """A checkpoint folder as transformers writes it (per-expert names on disk), and its model."""
    model = fused_model(model_type)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_unfused_experts_compute_what_the_fused_ones_do(model_type):
    tokens = random_tokens()
    unfused, fused = build_tiny(model_type), fused_model(model_type)
    assert isinstance(unfused.model.layers[first_moe_block(model_type)].mlp.experts, Experts)
    assert (logits(unfused, tokens) - logits(fused, tokens)).abs().max() <= 1e-5


def _moe_inputs(model, b: int, tokens) -> torch.Tensor:
    """The tokens the MoE layer of block `b` reads, `(tokens, hidden)`, from a hook on transformers' forward."""
    seen = []
    handle = model.model.layers[b].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_every_expert_is_calibrated_on_every_token_and_the_next_block_sees_real_routing(model_type):
    tokens = random_tokens()
    fused, b = fused_model(model_type), first_moe_block(model_type)
    x = _moe_inputs(fused, b, tokens)  # (tokens, hidden)
    layer = fused.model.layers[b].mlp
    experts = layer.experts
    with torch.no_grad():
        chosen = (layer.router if hasattr(layer, "router") else layer.gate)(x)[2]  # (tokens, top_k): its routing
        n = experts.gate_up_proj.shape[0]
    model = build_tiny(model_type)
    stats = Statistics()
    summary = sweep(Loaded(model, arch_for(model.config)), [stats], tokens, batch_size=2, progress=False)
    absmax = stats.inputs["absmax"]
    for e in range(n):
        with torch.no_grad():  # (tokens, I): every token through transformers' own gate function
            w = experts.gate_up_proj[e] if getattr(experts, "is_transposed", False) else experts.gate_up_proj[e].T
            bias = experts.gate_up_proj_bias[e] if getattr(experts, "has_bias", False) else 0
            h = experts._apply_gate(x @ w + bias)
        got = absmax[f"model.layers.{b}.mlp.experts.{e}.down_proj"]
        assert torch.allclose(got, h.abs().amax(0), rtol=1e-5, atol=1e-6), e
    # The routed-token histogram is the model's own routing.
    assert summary["routed_tokens"][f"model.layers.{b}"] == torch.bincount(chosen.reshape(-1), minlength=n).tolist()
    # The next block sees what it sees in the model's forward: its input norm's output equals a hook on it.
    seen = []
    handle = fused.model.layers[b + 1].input_layernorm.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        fused(input_ids=tokens, use_cache=False)
    handle.remove()
    expected = torch.cat([o.reshape(-1, o.shape[-1]) for o in seen]).abs().amax(0)
    reader = arch_for(fused.config).of_block(b + 1).norm_pairs[0].linears[0]  # q_proj, or MLA's q_a_proj
    assert torch.allclose(absmax[f"model.layers.{b + 1}.{reader}"], expected, rtol=1e-5, atol=1e-6)


def _never_route(model, expert: int) -> None:
    """Make every router of `model` skip `expert` (its logit -inf), as a rarely used expert would be."""
    for layer in model.model.layers:
        gate = layer.mlp.gate

        def forward(h, gate=gate):
            h = h.reshape(-1, gate.weight.shape[1])
            logits = torch.nn.functional.linear(h, gate.weight)
            logits[:, expert] = -float("inf")
            top, index = logits.softmax(-1).topk(gate.top_k, -1)
            return logits, top / top.sum(-1, keepdim=True), index

        gate.forward = forward


@pytest.mark.parametrize("all_experts", [True, False])
def test_an_expert_routing_never_picks_still_gets_finite_scales(tmp_path, capsys, all_experts):
    from lite.steps.smoothquant import SmoothQuant

    model = build_tiny("qwen3_moe")
    _never_route(model, 3)
    stats, smooth = Statistics(), SmoothQuant(0.5, "lmdeploy")
    summary = sweep(Loaded(model, arch_for(model.config)), [stats, smooth], random_tokens(), batch_size=2,
                    progress=False, all_experts=all_experts)
    assert all(counts[3] == 0 for counts in summary["routed_tokens"].values())
    idle = "model.layers.0.mlp.experts.3.down_proj"
    assert (idle in stats.inputs["absmax"]) == all_experts
    assert (idle in smooth.found) == all_experts  # off: that pair is left unsmoothed, and said
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in smooth.found.values())
    warned = "no calibration token reached model.layers.0.mlp.experts.3" in capsys.readouterr().err
    assert warned == (not all_experts)


@pytest.mark.parametrize("fmt", ["lmdeploy", "compressed-tensors"])
def test_streamed_moe_checkpoint_is_written_per_expert_with_float_routers(tmp_path, fmt):
    src = tmp_path / "model"
    save_fused(src, "qwen2_moe")
    assert open_streamed(str(src)) is not None  # the per-expert names on disk stream as they are
    out = tmp_path / "w" / "quantized"
    main(["smooth_quant", str(src), "--work-dir", str(tmp_path / "w"), "--format", fmt, *CALIB])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    config = tiny_config("qwen2_moe")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        for e in range(config.num_experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert saved[f"{p}.experts.{e}.{name}.weight"].dtype == torch.int8, (i, e, name)
        for name in ("gate", "shared_expert_gate"):
            assert saved[f"{p}.{name}.weight"].dtype == torch.float32
        assert not any(k.startswith(f"{p}.experts.gate_up_proj") for k in saved)
    # The routing histogram is kept beside the statistics: every block's counts sum to tokens x top-k.
    routed = torch.load(tmp_path / "w" / "routed_tokens.pth", weights_only=True)
    assert set(routed) == {"model.layers.0", "model.layers.1"}
    assert all(int(counts.sum()) == 4 * 64 * config.num_experts_per_tok for counts in routed.values())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    listed = qc["ignore"] if fmt == "compressed-tensors" else qc["modules_to_not_convert"]
    routers = [f"model.layers.{i}.mlp.{name}" for i in range(2) for name in ("gate", "shared_expert_gate")]
    assert set(routers) <= set(listed)


def test_weight_only_moe_quantizes_every_expert(tmp_path):
    out = tmp_path / "w" / "quantized"
    main(["auto_gptq", "tiny:qwen3_moe", "--work-dir", str(tmp_path / "w"), "--w-group-size", "32", *CALIB])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for i in range(2):
        for e in range(4):
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{i}.mlp.experts.{e}.{name}.weight_packed" in names
        assert f"model.layers.{i}.mlp.gate.weight" in names


@pytest.mark.parametrize("model_type, dense", [("qwen3_moe", dict(mlp_only_layers=[1])),
                                               ("qwen2_moe", dict(decoder_sparse_step=2)),
                                               ("deepseek_v3", dict(first_k_dense_replace=2))])
def test_a_model_mixing_dense_and_moe_blocks_is_quantized_block_by_block(tmp_path, model_type, dense):
    """Each block by its own record: the dense blocks' MLP linears and the MoE blocks' experts are int8, the
    routers float; the layout of transformers' config decides which block is which."""
    config = tiny_config(model_type, num_hidden_layers=3, **dense)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    is_dense = [not hasattr(layer.mlp, "experts") for layer in model.model.layers]  # transformers' own layout
    assert any(is_dense) and not all(is_dense)
    src = tmp_path / "model"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    main(["smooth_quant", str(src), "--work-dir", str(tmp_path / "w"), "--format", "compressed-tensors", *CALIB])
    written = ShardReader(str(tmp_path / "w" / "quantized")).entries
    for i, dense_block in enumerate(is_dense):
        p = f"model.layers.{i}.mlp"
        if dense_block:
            assert all(written[f"{p}.{n}.weight"].dtype == torch.int8 for n in ("gate_proj", "up_proj", "down_proj"))
            assert not any(k.startswith(f"{p}.experts.") or k.startswith(f"{p}.gate.") for k in written)
        else:
            assert written[f"{p}.experts.3.down_proj.weight"].dtype == torch.int8
            assert written[f"{p}.gate.weight"].dtype != torch.int8


def test_a_family_without_a_dense_record_refuses_dense_blocks_in_one_line(monkeypatch):
    import dataclasses

    monkeypatch.setitem(ARCHS, "qwen3_moe", dataclasses.replace(ARCHS["qwen3_moe"], dense=None))
    with pytest.raises(LiteError, match="mixes dense and MoE layers"):
        arch_for(tiny_config("qwen3_moe", mlp_only_layers=[0]))


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_every_record_passes_the_fit_check(model_type):
    config = tiny_config(model_type)
    check_folding_fits(config, arch_for(config))


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_the_fit_check_catches_a_norm_reader_missing_from_the_record(model_type, monkeypatch):
    import dataclasses

    arch = ARCHS[model_type]
    first, *rest = arch.norm_pairs
    wrong = dataclasses.replace(arch, norm_pairs=(dataclasses.replace(first, linears=first.linears[:-1]), *rest))
    if arch.dense is not None:
        dense_first, *dense_rest = arch.dense.norm_pairs
        wrong = dataclasses.replace(wrong, dense=dataclasses.replace(
            arch.dense, norm_pairs=(dataclasses.replace(dense_first, linears=dense_first.linears[:-1]),
                                    *dense_rest)))
    monkeypatch.setitem(ARCHS, model_type, wrong)
    config = tiny_config(model_type)
    with pytest.raises(LiteError, match="does not describe this model"):
        check_folding_fits(config, arch_for(config))


def test_the_fit_check_refuses_a_wrong_record_before_any_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ARCHS, "gemma2", ARCHS["gemma"])  # gemma2's sandwich norms are not gemma's
    message = lite_error(capsys, "smooth_quant", "tiny:gemma2", "--work-dir", tmp_path / "w", *CALIB)
    assert "record for model_type 'gemma2' does not describe this model" in message
    assert not os.path.exists(tmp_path / "w" / "quantized")


def test_readme_lists_every_supported_model_type():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    listed = readme.split("<!-- model types: begin -->")[1].split("<!-- model types: end -->")[0]
    assert [t.strip() for t in listed.replace("\n", " ").split(",")] == sorted(ARCHS)


def test_mixtral_is_read_and_written_under_its_checkpoint_names(tmp_path):
    """Mixtral's checkpoint names its experts `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down), which
    transformers renames at load time; lite streams them under the record's name map and writes them back
    under the same names, each expert quantized, the router float."""
    src = tmp_path / "model"
    fused = save_fused(src, "mixtral")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in ShardReader(str(src)).entries
    assert open_streamed(str(src)) is not None
    main(["smooth_quant", str(src), "--work-dir", str(tmp_path / "w"), "--format", "compressed-tensors", *CALIB])
    out = tmp_path / "w" / "quantized"
    written = ShardReader(str(out)).entries
    for i in range(2):
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                assert written[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"].dtype == torch.int8
        assert written[f"model.layers.{i}.block_sparse_moe.gate.weight"].dtype == torch.float32
    assert not any(".mlp." in name for name in written)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.block_sparse_moe.gate" in qc["ignore"]
    # Read back by lite (under the map) it computes close to the float model.
    tokens = random_tokens()
    from lite.formats import load_checkpoint

    assert (logits(load_checkpoint(str(out)), tokens) - logits(fused, tokens)).abs().max() < 0.1


def test_doge_with_its_cross_domain_moe_is_refused_in_one_line():
    with pytest.raises(LiteError, match="doge with is_moe"):
        arch_for(tiny_config("doge", is_moe=True, num_experts=16, num_experts_per_tok=2))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_layouts_cut_every_expert_and_find_each_element(transposed, interleaved):
    """For every layout transformers' flags describe, each expert's gate/up/down weight and bias cut from
    the fused tensors is what the layout says (written out here by index arithmetic), and `flat_indices`
    finds each of its elements in the fused tensor (what the streamed identity hash samples)."""
    from lite.moe import FusedLayout

    layout, (E, I, H) = FusedLayout(transposed, interleaved), (3, 4, 5)
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn((E, H, 2 * I) if transposed else (E, 2 * I, H), generator=g)
    down = torch.randn((E, I, H) if transposed else (E, H, I), generator=g)
    gate_up_bias, down_bias = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
    for e in range(E):
        w = gate_up[e].T if transposed else gate_up[e]  # (2I, H)
        rows = {"gate_proj": [2 * r if interleaved else r for r in range(I)],
                "up_proj": [2 * r + 1 if interleaved else I + r for r in range(I)]}
        expected = {("gate_proj", False): w[rows["gate_proj"]], ("up_proj", False): w[rows["up_proj"]],
                    ("down_proj", False): down[e].T if transposed else down[e],
                    ("gate_proj", True): gate_up_bias[e, rows["gate_proj"]],
                    ("up_proj", True): gate_up_bias[e, rows["up_proj"]], ("down_proj", True): down_bias[e]}
        for (proj, bias), want in expected.items():
            fused = (down_bias if bias else down) if proj == "down_proj" else (gate_up_bias if bias else gate_up)
            got = layout.take(fused, e, proj, bias)
            assert torch.equal(got, want), (e, proj, bias)
            where = layout.flat_indices(tuple(fused.shape), e, proj, bias, list(range(got.numel())))
            assert torch.equal(fused.flatten()[where], want.flatten()), (e, proj, bias)
