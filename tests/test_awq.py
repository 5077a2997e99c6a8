"""`awq` (activation-aware scales) and weight-only `rtn`: the scales leave the float model unchanged,
one factor per KV head under grouped-query attention, the search never loses to no scaling, and
`lite auto_awq` writes an AutoAWQ folder that is closer to the float model than round to nearest."""

import json

import torch

from helpers import logits, relative_difference
from lite.archs import arch_for, kv_group_index
from lite.cli.main import main
from lite.data import calibration_tokens
from lite.formats import load_checkpoint
from lite.model import build_tiny, byte_tokenizer, decoder_blocks
from lite.smooth import fold_scales_
from lite.source import Loaded
from lite.steps import Step, create
from lite.sweep import sweep

TOKENS = calibration_tokens(byte_tokenizer(), "sample", 8, 64, 0)


class FoldOnly(Step):
    """Folds what the steps before it left on the block, and keeps a copy of the scales."""

    def __init__(self):
        self.scales = {}

    def apply_(self, block):
        self.scales.update({k: v.clone() for k, v in block.scales.items()})
        fold_scales_(block.module, block.prefix, block.arch, block.config, block.scales)
        block.scales = {}


def searched(model, **settings):
    fold = FoldOnly()
    sweep(Loaded(model, arch_for(model.config)),
          [create("awq", **settings), fold], TOKENS, batch_size=4, progress=False)
    return fold.scales


def test_awq_scales_leave_the_float_model_unchanged():
    for model_type in ("llama", "phi3", "gemma"):
        model, reference = build_tiny(model_type), build_tiny(model_type)
        scales = searched(model, bits=3, group_size=-1)
        assert any(not torch.allclose(s, torch.ones_like(s)) for s in scales.values())  # something was scaled
        assert relative_difference(logits(model, TOKENS), logits(reference, TOKENS)) < 1e-5


def test_one_factor_per_kv_head_under_grouped_query_attention():
    model = build_tiny("llama")  # 8 query heads, 4 KV heads
    scales = searched(model, bits=3, group_size=-1)
    index = kv_group_index(model.config)
    for prefix in decoder_blocks(model, arch_for(model.config)):
        s = scales[f"{prefix}.self_attn.o_proj"]
        per_v = torch.zeros(int(index.max()) + 1).index_put_((index,), s)
        assert torch.equal(s, per_v[index])  # every query head reading a V channel has its factor


def test_search_never_loses_to_no_scaling_and_usually_wins():
    model = build_tiny("llama")
    step = create("awq", bits=3, group_size=-1)
    sweep(Loaded(model, arch_for(model.config)), [step, FoldOnly()], TOKENS, batch_size=4, progress=False)
    assert len(step.losses) == 14  # every linear of both blocks
    assert all(best <= unscaled for best, unscaled in step.losses.values())
    # The search is not a no-op: most pairs find a factor that beats no scaling.
    assert sum(best < 0.99 * unscaled for best, unscaled in step.losses.values()) >= 7


def test_auto_awq_writes_an_awq_folder_closer_to_float_than_round_to_nearest(tmp_path):
    common = ["--calib-dataset", "sample", "--calib-samples", "8", "--calib-seqlen", "64", "--device", "cpu",
              "--w-bits", "3", "--w-group-size", "32", "--batch-size", "4"]
    main(["auto_awq", "tiny:llama", "--work-dir", str(tmp_path / "awq"), "--format", "compressed-tensors", *common])
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text("steps:\n  - rtn: {bits: 3, group_size: 32, symmetric: false}\nformat: compressed-tensors\n")
    main(["run", str(recipe), "tiny:llama", "--work-dir", str(tmp_path / "rtn"), *common[:6]])
    reference = logits(build_tiny("llama"), TOKENS)
    error = {name: (logits(load_checkpoint(str(tmp_path / name / "quantized")), TOKENS) - reference).pow(2).mean()
             for name in ("awq", "rtn")}
    assert error["awq"] < 0.8 * error["rtn"], error


def test_auto_awq_default_format_is_autoawq_gemm(tmp_path):
    main(["auto_awq", "tiny:llama", "--work-dir", str(tmp_path / "w"), "--calib-dataset", "sample",
          "--calib-samples", "4", "--calib-seqlen", "32", "--device", "cpu", "--w-group-size", "32"])
    config = json.loads((tmp_path / "w" / "quantized" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    marker = json.loads((tmp_path / "w" / "quantized" / "lite_output.json").read_text())
    assert [name for name, _ in marker["export"]["steps"]] == ["awq", "rtn"]


def test_expert_searches_keep_the_routed_share_of_tokens(monkeypatch):
    """With every expert calibrated on every token, a MoE expert's own pair (up -> down) keeps only the
    tokens routing gives one expert on average, `max_tokens * top_k / experts`, cut to exactly that; the
    MoE layer's pair (norm -> every expert's gate/up) keeps whole calls up to `max_tokens`."""
    import lite.steps.awq as awq

    kept = {}

    class Recording(awq.Calls):
        def mean_abs(self):
            inputs = [args[0] if args else kwargs["hidden_states"] for args, kwargs, _ in self.calls]
            kept[id(self)] = (self.max_tokens, sum(x.reshape(-1, x.shape[-1]).shape[0] for x in inputs))
            return super().mean_abs()

    monkeypatch.setattr(awq, "Calls", Recording)
    model = build_tiny("qwen3_moe")  # 4 experts, 2 per token
    step = create("awq", bits=4, group_size=-1, max_tokens=96, n_grid=2)
    sweep(Loaded(model, arch_for(model.config)), [step, FoldOnly()], TOKENS, batch_size=4, progress=False)
    caps = sorted(cap for cap, _ in kept.values())
    assert caps.count(48) == 2 * 4  # each block's 4 experts: 96 * 2 / 4
    for cap, tokens in kept.values():
        if cap == 48:
            assert tokens == 48  # cut to the share; each call holds 4 x 64 tokens
        else:
            assert cap == 96 and tokens >= 96  # whole calls of 256 tokens


def test_a_cut_call_holds_only_the_kept_rows():
    """The kept rows are copies: a view would hold the whole call's input and output alive."""
    from lite.steps.awq import Calls

    calls = Calls(3, cut_rows=True)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    calls.update_call((x,), {}, y)
    (args, _, out), = calls.calls
    assert torch.equal(args[0], x.reshape(-1, 8)[:3]) and torch.equal(out, y.reshape(-1, 4)[:3])
    assert args[0].untyped_storage().nbytes() == 3 * 8 * 4 and out.untyped_storage().nbytes() == 3 * 4 * 4
    calls.update_call((x,), {}, y)  # full: nothing more kept, every token still counted in the mean
    assert len(calls.calls) == 1 and calls.count == 20
