"""compressed-tensors checkpoints: layout, a real consumer (transformers + the compressed-tensors
package) loading what lite wrote, the vLLM-compatibility check, and the export options.

Tolerances against transformers. Both sides compute from the same stored integers and scales, but
in a different fp32 operation order (transformers dequantizes the weight and runs a float matmul;
lite multiplies integer codes and scales afterwards). Now and then that moves an activation across
a rounding boundary, which changes it by one whole quantization step, and the tiny random models
(residual stream ~0.02, so each RMSNorm multiplies differences by ~50) carry such a flip to the
logits. So the yardstick is lite's own quantization error e = |lite - float|, not fp32 epsilon:

- Same grid (int8 and fp8 static: the stored `input_scale`; fp8 dynamic: `absmax / 448` per token on
  both sides): flips are rare, so mean |lite - transformers| <= 0.2 · mean e and max <= 0.5 · max e
  (measured over five token seeds: at most 0.08 and 0.33). A real format error (activations left
  unquantized, a wrong scale, smoothing not folded) disagrees by the order of e itself.
- int8 dynamic: transformers' emulation takes per-token scales `absmax / 127.5`, lite and vLLM's
  kernel `absmax / 127`, so every activation sits on a slightly different grid and the two differ
  by about e (measured mean 0.76-0.84 · e, max up to 1.09 · e): bound 1.5 · mean e and 2 · max e.
  With lite's reader switched to 127.5 the same-grid bounds hold, which shows the grid is the only
  difference.
"""

import json

import pytest
import torch
from safetensors import safe_open

from helpers import input_absmax, logits, random_tokens
from lite import compressed_tensors as ct
from lite import quant
from lite.archs import ARCHS
from lite.errors import LiteError
from lite.formats import check_export_options
from lite.model import build_tiny, byte_tokenizer
from lite.observers import ActSettings
from lite.qmodules import QLinear, QRMSNorm
from lite.smooth import migration_scales

SCHEMES = {"int8-dynamic": ("int8", "dynamic"), "int8-static": ("int8", "static"), "fp8-dynamic": ("fp8", "dynamic"),
           "fp8-static": ("fp8", "static")}


def quantized_tiny(quant_dtype: str, act_scheme: str, tokens: torch.Tensor):
    """A smoothed (alpha 0.5) tiny llama quantized for compressed-tensors, and its float original."""
    model = build_tiny("llama")
    float_model = build_tiny("llama")
    blocks = {f"model.layers.{i}": b for i, b in enumerate(model.model.layers)}
    scales = migration_scales(blocks, ct.arch_for(model.config), model.config, input_absmax(model, tokens), 0.5,
                              "lmdeploy")
    ct.quantize_model_(model, quant_dtype, scales, ActSettings(act_scheme), tokens, 2, "cpu", progress=False)
    return model, float_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """`{scheme: (folder, in-memory quantized model, float model)}` for every scheme of `SCHEMES`."""
    tokens = random_tokens()
    out = {}
    for name, (quant_dtype, act_scheme) in SCHEMES.items():
        model, float_model = quantized_tiny(quant_dtype, act_scheme, tokens)
        folder = str(tmp_path_factory.mktemp(name))
        ct.write_checkpoint(model, byte_tokenizer(), None, folder)
        out[name] = (folder, model, float_model)
    return out


def transformers_logits(folder: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(folder).eval(), tokens)


def disagreement(ours: torch.Tensor, theirs: torch.Tensor, float_logits: torch.Tensor) -> tuple[float, float]:
    """(mean, max) of |ours - theirs| as fractions of the mean and max quantization error |ours - float|."""
    d, e = (ours - theirs).abs(), (ours - float_logits).abs()
    return (d.mean() / e.mean()).item(), (d.max() / e.max()).item()


@pytest.mark.parametrize("scheme", ["int8-static", "fp8-dynamic", "fp8-static"])
def test_transformers_agrees_with_lite_reader_on_the_same_grid(folders, scheme):
    pytest.importorskip("compressed_tensors")
    folder, _, float_model = folders[scheme]
    tokens = random_tokens(seed=7)
    ours = logits(ct.load_compressed_tensors(folder), tokens)
    mean, peak = disagreement(ours, transformers_logits(folder, tokens), logits(float_model, tokens))
    assert mean <= 0.2 and peak <= 0.5


def test_transformers_int8_dynamic_differs_only_by_its_127_5_grid(folders, monkeypatch):
    pytest.importorskip("compressed_tensors")
    folder, _, float_model = folders["int8-dynamic"]
    tokens = random_tokens(seed=7)
    theirs, reference = transformers_logits(folder, tokens), logits(float_model, tokens)
    ours = logits(ct.load_compressed_tensors(folder), tokens)
    mean, peak = disagreement(ours, theirs, reference)
    assert mean <= 1.5 and peak <= 2.0
    with monkeypatch.context() as m:
        m.setitem(quant.QMAX, torch.int8, 127.5)  # compressed-tensors' symmetric int8 grid
        ours_127_5 = logits(ct.load_compressed_tensors(folder), tokens)
    mean, peak = disagreement(ours_127_5, theirs, reference)
    assert mean <= 0.2 and peak <= 0.5


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_reader_computes_what_the_in_memory_model_computed(folders, scheme):
    folder, model, _ = folders[scheme]
    tokens = random_tokens(seed=3)
    assert torch.equal(logits(ct.load_compressed_tensors(folder), tokens), logits(model, tokens))


def test_layout_is_what_formats_md_says(folders):
    folder, model, _ = folders["int8-static"]
    with open(f"{folder}/config.json") as f:
        qc = json.load(f)["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == group["format"] == "int-quantized"
    assert qc["quantization_status"] == "compressed" and qc["kv_cache_scheme"] is None
    assert group["targets"] == ["Linear"] and group["output_activations"] is None
    assert set(group["weights"]) == set(ct.ARG_KEYS) == set(group["input_activations"])
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "tensor"
    assert qc["ignore"] == ["lm_head"]
    assert not any(isinstance(m, QRMSNorm) for m in model.modules())
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        ws = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        xs = f.get_tensor("model.layers.0.mlp.down_proj.input_scale")
    assert q.dtype == torch.int8 and tuple(ws.shape) == (q.shape[0], 1) and ws.dtype == torch.float32
    assert tuple(xs.shape) == (1,)
    assert not any(n.endswith(".scale") or "migration_scale" in n for n in names)
    with open(f"{folders['fp8-dynamic'][0]}/config.json") as f:
        fp8 = json.load(f)["quantization_config"]
    assert fp8["format"] == "float-quantized" and fp8["config_groups"]["group_0"]["input_activations"]["dynamic"]


def test_static_scales_land_on_the_qlinears(folders):
    _, model, _ = folders["int8-static"]
    layer = model.model.layers[0]
    assert all(isinstance(layer.get_submodule(n), QLinear) for n in ("self_attn.q_proj", "mlp.down_proj"))
    assert layer.self_attn.q_proj.input_scale is not None
    assert folders["int8-dynamic"][1].model.layers[0].self_attn.q_proj.input_scale is None


def args(**overrides):
    """Symmetric int8 per-channel weights, or activations per token, with overrides."""
    return {**ct.quant_args(torch.int8, "channel", False, "minmax"), **overrides}


def test_vllm_check_accepts_lites_schemes():
    for quant_dtype in ("int8", "fp8"):
        for scheme in ("dynamic", "static"):
            weights, inputs = ct.scheme_args(quant_dtype, ActSettings(scheme))
            ct.check_vllm_loadable(weights, inputs, ct.FORMAT_OF[quant.quant_dtype_of(quant_dtype)])


def test_vllm_check_rejects_asymmetric_int8_weights():
    with pytest.raises(LiteError, match="asymmetric int8 weights"):
        ct.check_vllm_loadable(args(symmetric=False), args(strategy="token", dynamic=True))


def test_vllm_check_rejects_group_wise_int8_with_activations():
    with pytest.raises(LiteError, match="strategy 'group'"):
        ct.check_vllm_loadable(args(strategy="group", group_size=128), args(strategy="token", dynamic=True))
    # the same weights without activation quantization are a weight-only scheme vLLM runs
    ct.check_vllm_loadable(args(strategy="group", group_size=128), None, "pack-quantized")


def test_vllm_check_rejects_other_unloadable_schemes():
    with pytest.raises(LiteError, match="per token dynamic or per tensor static"):
        ct.check_vllm_loadable(args(), args(strategy="tensor", dynamic=True))
    with pytest.raises(LiteError, match="readers reject"):
        ct.check_vllm_loadable(args(scale_dtype=None), None)
    fp8 = ct.quant_args(torch.float8_e4m3fn, "channel", False)
    with pytest.raises(LiteError, match="int8 input activations"):
        ct.check_vllm_loadable(args(), {**fp8, "strategy": "token", "dynamic": True})


def test_export_options_refuse_what_a_format_cannot_store():
    with pytest.raises(LiteError, match="compressed-tensors"):
        check_export_options("lmdeploy", ActSettings("static"), False)
    with pytest.raises(LiteError, match="--format lmdeploy"):
        check_export_options("compressed-tensors", ActSettings(), True)
    with pytest.raises(LiteError, match="lmdeploy, compressed-tensors"):
        check_export_options("gguf", ActSettings(), False)
    check_export_options("compressed-tensors", ActSettings("static", "mse"), False)


def test_cli_smooth_quant_writes_a_checked_static_folder(tmp_path, capsys):
    from lite.cli.main import main

    main(["smooth_quant", "tiny:llama", "--work-dir", str(tmp_path / "w"), "--format", "compressed-tensors",
          "--act-scheme", "static", "--act-observer", "percentile", "--calib-dataset", "sample",
          "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "read-back check: max |logit difference| 0 " in out
    model = ct.load_compressed_tensors(str(tmp_path / "w" / "quantized"))
    assert model.model.layers[1].mlp.up_proj.input_scale is not None
    with pytest.raises(SystemExit) as e:
        main(["smooth_quant", "tiny:llama", "--work-dir", str(tmp_path / "w2"), "--act-scheme", "static",
              "--calib-dataset", "sample", "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"])
    assert e.value.code == 2 and "needs --format compressed-tensors" in capsys.readouterr().err


def _every_type():
    """Every supported `model_type`. transformers 5.24 has no map from per-expert names to gpt_oss's fused
    experts (it reports them MISSING and starts them from random values); llm-compressor writes quantized
    gpt-oss per expert too, and vLLM's loader for that is under way (vllm-project/vllm#29315)."""
    gpt_oss = pytest.mark.xfail(strict=True, reason="transformers 5.24 cannot map per-expert gpt_oss tensors")
    return [pytest.param(t, marks=gpt_oss) if t == "gpt_oss" else t for t in sorted(ARCHS)]


@pytest.mark.parametrize("model_type", _every_type())
def test_transformers_loads_every_supported_type_and_agrees(tmp_path, model_type):
    """fp8 with static input scales (the same grid on both sides): transformers' own loader with the
    compressed-tensors package computes what lite's reader computes, within the rounding flips above.

    MoE: transformers 5.24 fuses the per-expert tensors at load time into its 3-D experts, dequantized, and
    drops their input scales (it reports them UNEXPECTED): its experts run with float activations. Its
    fused weights must equal lite's dequantized experts exactly, and with lite's experts computing the
    same way (dequantized weights, float inputs) the logits must agree within the same bounds."""
    pytest.importorskip("compressed_tensors")
    tokens = random_tokens()
    model, float_model = build_tiny(model_type), build_tiny(model_type)
    arch = ct.arch_for(model.config)
    blocks = {f"{arch.blocks}.{i}": b for i, b in enumerate(model.get_submodule(arch.blocks))}
    scales = migration_scales(blocks, arch, model.config, input_absmax(model, tokens), 0.5, "lmdeploy")
    ct.quantize_model_(model, "fp8", scales, ActSettings("static"), tokens, 2, "cpu", progress=False)
    ct.write_checkpoint(model, byte_tokenizer(), None, str(tmp_path / "q"))
    check = random_tokens(seed=7)
    reader = ct.load_compressed_tensors(str(tmp_path / "q"))
    if arch.experts:
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q")).eval()
        for i, block in enumerate(reader.get_submodule(arch.blocks)):
            if i in arch.dense_blocks:
                continue
            fused = theirs.get_submodule(f"{arch.blocks}.{i}.{arch.experts}")
            for e, expert in enumerate(block.get_submodule(arch.experts)):
                _check_fused_equals(fused, e, expert)
                for name in ("gate_proj", "up_proj", "down_proj"):  # as transformers computes them
                    q = expert.get_submodule(name)
                    linear = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
                    linear.weight.data, linear.bias = q.dequantized_weight().float(), q.bias
                    expert.set_submodule(name, linear)
    ours = logits(reader, check)
    mean, peak = disagreement(ours, transformers_logits(str(tmp_path / "q"), check), logits(float_model, check))
    assert mean <= 0.2 and peak <= 0.5


def _check_fused_equals(fused, e: int, expert) -> None:
    """transformers' fused expert tensors, sliced by its documented layouts ([gate; up] rows `(E, 2I, H)`,
    or gpt_oss's `(E, H, 2I)` with gate and up interleaved), equal lite's dequantized expert `e`."""
    gate_up, down = fused.gate_up_proj[e].detach(), fused.down_proj[e].detach()
    if getattr(fused, "is_transposed", False):
        gate_up, down = gate_up.T, down.T
    if getattr(fused, "is_concatenated", True):
        gate, up = gate_up.chunk(2)
    else:
        gate, up = gate_up[0::2], gate_up[1::2]
    for mine, theirs in ((expert.gate_proj, gate), (expert.up_proj, up), (expert.down_proj, down)):
        assert torch.equal(mine.dequantized_weight().float(), theirs.float()), e
