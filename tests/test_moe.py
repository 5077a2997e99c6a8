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

from helpers import lite_error, logits, random_tokens
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


def fused_model(model_type: str) -> torch.nn.Module:
    """transformers' own model (fused 3-D experts) with the weights of `build_tiny(model_type)`."""
    unfused = build_tiny(model_type)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()
    state = unfused.state_dict()
    arch = arch_for(model.config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj"):
                prefix = name.removesuffix("gate_up_proj")
                n = p.shape[0]
                p.copy_(torch.stack([torch.cat([state[f"{prefix}{e}.gate_proj.weight"],
                                                state[f"{prefix}{e}.up_proj.weight"]]) for e in range(n)]))
            elif name.endswith("experts.down_proj"):
                prefix = name.removesuffix("down_proj")
                p.copy_(torch.stack([state[f"{prefix}{e}.down_proj.weight"] for e in range(p.shape[0])]))
            else:
                p.copy_(state[name])
    assert arch.experts is not None
    return model


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
    assert isinstance(unfused.model.layers[0].mlp.experts, Experts)
    assert (logits(unfused, tokens) - logits(fused, tokens)).abs().max() <= 1e-5


def _block0_moe_inputs(model, tokens) -> torch.Tensor:
    """The tokens the MoE layer of block 0 reads, `(tokens, hidden)`, from a hook on transformers' forward."""
    seen = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_every_expert_is_calibrated_on_every_token_and_the_next_block_sees_real_routing(model_type):
    tokens = random_tokens()
    fused = fused_model(model_type)
    x = _block0_moe_inputs(fused, tokens)  # (tokens, hidden)
    layer = fused.model.layers[0].mlp
    with torch.no_grad():
        chosen = layer.gate(x)[2]  # (tokens, top_k): transformers' own routing
        act = fused.model.layers[0].mlp.experts.act_fn
        n, two_i, _ = layer.experts.gate_up_proj.shape
    model = build_tiny(model_type)
    stats = Statistics()
    summary = sweep(Loaded(model, arch_for(model.config)), [stats], tokens, batch_size=2, progress=False)
    absmax = stats.inputs["absmax"]
    for e in range(n):
        gate_up = layer.experts.gate_up_proj[e].detach()  # (2I, H)
        with torch.no_grad():
            h = act(x @ gate_up[:two_i // 2].T) * (x @ gate_up[two_i // 2:].T)  # (tokens, I): every token
        got = absmax[f"model.layers.0.mlp.experts.{e}.down_proj"]
        assert torch.allclose(got, h.abs().amax(0), rtol=1e-5, atol=1e-6), e
    # The routed-token histogram is the model's own routing.
    assert summary["routed_tokens"]["model.layers.0"] == torch.bincount(chosen.reshape(-1), minlength=n).tolist()
    # Block 1 sees what it sees in the model's forward: its input norm's output equals a hook on it.
    seen = []
    handle = fused.model.layers[1].input_layernorm.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        fused(input_ids=tokens, use_cache=False)
    handle.remove()
    expected = torch.cat([o.reshape(-1, o.shape[-1]) for o in seen]).abs().amax(0)
    assert torch.allclose(absmax["model.layers.1.self_attn.q_proj"], expected, rtol=1e-5, atol=1e-6)


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


def test_a_model_mixing_dense_and_moe_layers_is_refused_in_one_line():
    config = tiny_config("qwen3_moe", mlp_only_layers=[0])
    with pytest.raises(LiteError, match="mixes dense and MoE layers"):
        arch_for(config)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_every_record_passes_the_fit_check(model_type):
    config = tiny_config(model_type)
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
