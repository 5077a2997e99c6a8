"""Weight-only checkpoints (`lite auto_gptq`): each format written from a tiny model and decoded by a
reference reader written here from FORMATS.md (numpy bit arithmetic, not lite's unpacking), the
pack-quantized folders loaded by transformers with compressed-tensors, the bad combinations refused
before any work, the streamed run equal to the loaded one, and the GPTQ solver's properties."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import lite_error, logits, random_tokens, relative_difference
from lite.cli.main import main
from lite.errors import LiteError
from lite.formats import load_checkpoint
from lite.gptq import gptq_quantize
from lite.model import build_tiny, byte_tokenizer
from lite.quant import dequantize_weight, quantize_weight, weight_qparams

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # FORMATS.md: column of the word's 8 held by nibble j


def nibbles(words: torch.Tensor, bits: int = 4) -> np.ndarray:
    """`(..., n)` int32 words -> `(..., n · 32/bits)` unsigned codes, lowest bits first."""
    u = words.numpy().astype(np.int64) & 0xFFFFFFFF
    per = 32 // bits
    parts = [(u >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
    return np.stack(parts, axis=-1).reshape(*u.shape[:-1], u.shape[-1] * per)


def read_state(folder: str) -> dict:
    return load_file(os.path.join(folder, "model.safetensors"))


def reference_weights(folder: str) -> dict[str, torch.Tensor]:
    """`{linear fqn: fp32 weight (out, in)}` of every quantized linear, decoded as FORMATS.md describes."""
    with open(os.path.join(folder, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    state, out = read_state(folder), {}
    if qc["quant_method"] == "compressed-tensors":
        args = qc["config_groups"]["group_0"]["weights"]
        for name in [n[: -len(".weight_packed")] for n in state if n.endswith(".weight_packed")]:
            o, i = state[f"{name}.weight_shape"].tolist()
            q = nibbles(state[f"{name}.weight_packed"], args["num_bits"])[:, :i] - 8  # signed codes
            s = state[f"{name}.weight_scale"].float().numpy()  # (out, groups)
            g = i if args["group_size"] is None else args["group_size"]
            if args["symmetric"]:
                z = np.zeros_like(s)
            else:  # packed along the output dimension: (out/8, groups)
                z = nibbles(state[f"{name}.weight_zero_point"].T.contiguous())[:, :o].T - 8  # (out, groups)
            groups = np.arange(i) // g
            out[name] = torch.tensor((q - z[:, groups]) * s[:, groups], dtype=torch.float32)
    elif qc["quant_method"] == "awq":
        g = qc["group_size"]
        for name in [n[: -len(".qweight")] for n in state if n.endswith(".qweight")]:
            def deinterleave(words):
                raw = nibbles(words)  # (rows, words·8), nibble order within each word
                cols = np.empty_like(raw)
                for j, c in enumerate(AWQ_ORDER):
                    cols[:, c::8] = raw[:, j::8]
                return cols
            q, z = deinterleave(state[f"{name}.qweight"]), deinterleave(state[f"{name}.qzeros"])  # (in, out), (G, out)
            s = state[f"{name}.scales"].float().numpy()  # (G, out)
            groups = np.arange(q.shape[0]) // g
            out[name] = torch.tensor(((q - z[groups]) * s[groups]).T, dtype=torch.float32)
    else:
        bits = qc["bits"]
        for name in [n[: -len(".qweight")] for n in state if n.endswith(".qweight")]:
            q = nibbles(state[f"{name}.qweight"].T.contiguous(), bits).T  # (in, out): word r nibble j = row 8r + j
            z = nibbles(state[f"{name}.qzeros"], bits)  # (G, out)
            if qc.get("checkpoint_format", "gptq") == "gptq":
                z = z + 1
            s = state[f"{name}.scales"].float().numpy()
            groups = state[f"{name}.g_idx"].numpy()
            out[name] = torch.tensor(((q - z[groups]) * s[groups]).T, dtype=torch.float32)
    return out


def reference_model(folder: str):
    """A float model from the folder's config whose linears hold the reference-decoded weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = read_state(folder)
    plain = {n: t for n, t in state.items() if n.endswith(("norm.weight", "embed_tokens.weight", "lm_head.weight"))}
    model.load_state_dict(plain, strict=False)
    weights = reference_weights(folder)
    assert len(weights) == 14, sorted(weights)  # 7 linears in each of the 2 blocks
    for name, w in weights.items():
        model.get_submodule(name).weight.data.copy_(w)
    model.tie_weights()
    return model


def export(tmp_path, *flags, name="quantized") -> str:
    out = str(tmp_path / name)
    main(["auto_gptq", "tiny:llama", "--work-dir", str(tmp_path / "w"), "--out-dir", out, "--calib-dataset",
          "sample", "--calib-samples", "8", "--calib-seqlen", "64", "--device", "cpu", "--w-group-size", "32",
          *flags])
    return out


CASES = {"ct-sym": ("--format", "compressed-tensors"), "ct-asym": ("--format", "compressed-tensors", "--w-sym", "false"),
         "awq": ("--format", "awq", "--w-sym", "false"), "awq-sym": ("--format", "awq"),
         "gptq": ("--format", "gptq"), "gptq-v2": ("--format", "gptq", "--w-sym", "false"),
         "ct-channel": ("--w-group-size", "-1")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {case: export(tmp_path_factory.mktemp(case), *flags) for case, flags in CASES.items()}


def test_asymmetric_gptq_warns_about_vllms_slow_kernel(tmp_path, capsys):
    export(tmp_path, "--format", "gptq", "--w-sym", "false")
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lite: warning:")]
    assert len(warning) == 1 and "gptq_v2" in warning[0] and "--w-sym true" in warning[0]


@pytest.mark.parametrize("case", list(CASES))
def test_reference_reader_agrees_with_lites_reader(folders, case):
    tokens = random_tokens(seed=5)
    ours = logits(load_checkpoint(folders[case]), tokens)
    reference = logits(reference_model(folders[case]), tokens)
    assert relative_difference(ours, reference) < 1e-5


def test_quantization_config_says_what_engines_read(folders):
    def qc(case):
        with open(os.path.join(folders[case], "config.json")) as f:
            return json.load(f)["quantization_config"]

    group = qc("ct-asym")["config_groups"]["group_0"]
    assert qc("ct-asym")["format"] == "pack-quantized" and group["input_activations"] is None
    assert group["weights"]["num_bits"] == 4 and group["weights"]["symmetric"] is False
    assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32
    assert qc("ct-channel")["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert qc("awq") == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
                         "modules_to_not_convert": ["lm_head"]}
    assert qc("gptq")["checkpoint_format"] == "gptq" and qc("gptq")["sym"] is True and qc("gptq")["desc_act"] is False
    assert qc("gptq-v2")["checkpoint_format"] == "gptq_v2"
    state = read_state(folders["gptq"])
    assert torch.equal(state["model.layers.0.mlp.down_proj.g_idx"], torch.arange(96, dtype=torch.int32) // 32)
    # Symmetric 4-bit: the zero point 8 is stored as 7 in GPTQ's original format (FORMATS.md).
    assert set(nibbles(state["model.layers.0.self_attn.q_proj.qzeros"]).ravel().tolist()) == {7}
    assert state["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state  # tied


@pytest.mark.parametrize("case", ["ct-sym", "ct-channel"])
def test_transformers_loads_pack_quantized_and_agrees(folders, case):
    # Asymmetric folders: transformers 5 (with compressed-tensors 0.20) allocates the zero points unpacked,
    # `(out, groups)`, and re-initializes the packed ones it reads; the next test checks that layout
    # against compressed-tensors' own compressor instead.
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    tokens = random_tokens(seed=9)
    theirs = logits(AutoModelForCausalLM.from_pretrained(folders[case]).eval(), tokens)
    ours = logits(load_checkpoint(folders[case]), tokens)
    assert relative_difference(ours, theirs) < 1e-4


def test_gptq_beats_round_to_nearest_on_the_loss_it_minimizes():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    X = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3 + torch.randn(128) * 2  # correlated inputs
    H = X.T @ X

    def loss(q, s, z, g):
        return ((X @ (dequantize_weight(q, s, z, g) - w).T) ** 2).sum().item()

    for symmetric in (True, False):
        for g in (-1, 32):
            for act_order in (True, False):
                q, s, z, _ = gptq_quantize(w, H, 4, g, symmetric, act_order=act_order)
                s0, z0 = weight_qparams(w, 4, g, symmetric)
                assert loss(q, s, z, g) < 0.6 * loss(quantize_weight(w, s0, z0, 4, g), s0, z0, g)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    # H diagonal: no column's error can be compensated by another, so GPTQ rounds each to nearest.
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    H = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5)
    for symmetric in (True, False):
        q, s, z, _ = gptq_quantize(w, H, 4, 16, symmetric, act_order=False)
        s0, z0 = weight_qparams(w, 4, 16, symmetric)
        assert torch.equal(q, quantize_weight(w, s0, z0, 4, 16)) and torch.equal(s, s0)


def test_gptq_raises_damping_until_the_hessian_factorizes():
    v = torch.ones(32) / 32 ** 0.5
    H = torch.eye(32) - 3 * torch.outer(v, v)  # an eigenvalue of -2: damping 0.01 · mean diag cannot fix it
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    q, s, z, damp = gptq_quantize(w, H, 4, -1, True, damp=0.01)
    assert damp > 0.01 and bool(torch.isfinite(s).all()) and q.abs().max() <= 8
    with pytest.raises(LiteError, match="calib-samples"):
        gptq_quantize(w, torch.eye(32) - 1e6 * torch.outer(v, v), 4, -1, True, damp=0.01)


@pytest.mark.parametrize("act_order, mse, damp", [(True, True, 0.01), (False, True, 0.01), (True, False, 1e-9)])
def test_gptq_on_a_hessian_it_may_overwrite_gives_the_same_result(act_order, mse, damp):
    """`overwrite_hessian` (the step hands its Hessian over to save (in, in) copies) permutes and damps H
    in place: the result must be what the solver gives on a copy, also with the clip search reading H's
    diagonal blocks and with damping raised."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 128, generator=g)
    x = torch.randn(48, 128, generator=g) * torch.rand(128, generator=g)  # rank 48 < 128: damping matters
    H = x.T @ x / 48
    expected = gptq_quantize(w, H, 4, 32, False, damp=damp, act_order=act_order, mse=mse)
    H_given = H.clone()
    got = gptq_quantize(w, H_given, 4, 32, False, damp=damp, act_order=act_order, mse=mse, overwrite_hessian=True)
    assert all(torch.equal(a, b) for a, b in zip(expected[:3], got[:3])) and expected[3] == got[3]
    assert not torch.equal(H_given, H) or not act_order  # it was indeed overwritten (permuted)
    if act_order and mse:  # static groups: each group's range searched with H's own diagonal block, unpermuted
        from lite.quant import MSE_CLIPS, mse_clip

        blocks = torch.stack([H[j:j + 32, j:j + 32] for j in range(0, 128, 32)])  # (groups, 32, 32)
        scale, zero = mse_clip(w, 4, 32, False, MSE_CLIPS, blocks)
        assert torch.equal(got[1], scale) and torch.equal(got[2], zero)


def test_dead_inputs_are_quantized_to_zero():
    H = torch.eye(16)
    H[3, 3] = 0  # an input channel that was always zero
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    q, s, z, _ = gptq_quantize(w, H, 4, -1, False)
    assert torch.equal(dequantize_weight(q, s, z)[:, 3], torch.zeros(4))


def test_streamed_run_writes_what_the_loaded_run_writes(tmp_path):
    folder = str(tmp_path / "model")
    build_tiny("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    common = ["--work-dir", str(tmp_path / "w"), "--calib-dataset", "sample", "--calib-samples", "8",
              "--calib-seqlen", "64", "--device", "cpu", "--w-group-size", "32", "--batch-size", "4"]
    main(["auto_gptq", folder, *common, "--out-dir", str(tmp_path / "streamed")])
    main(["auto_gptq", "tiny:llama", *common[:1], str(tmp_path / "w2"), *common[2:], "--out-dir",
          str(tmp_path / "loaded")])
    a, b = read_state(str(tmp_path / "streamed")), read_state(str(tmp_path / "loaded"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("flags, message", [
    (("--format", "awq", "--w-bits", "3"), "4-bit weights only"),
    (("--format", "awq", "--w-group-size", "-1"), "needs groups"),
    (("--format", "gptq", "--w-bits", "3"), "2, 4 or 8 bits"),
    (("--format", "lmdeploy"), "not a weight-only format"),
    (("--w-group-size", "48"), "not a multiple of --w-group-size 48"),
    (("--w-bits", "9"), "--w-bits must be an integer from 2 to 8"),
    (("--damp", "0"), "--damp must lie in (0, 1)"),
])
def test_bad_combinations_fail_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    line = lite_error(capsys, "auto_gptq", "tiny:llama", "--work-dir", tmp_path / "w", "--out-dir", out,
                      "--device", "cpu", *flags)
    assert message in line
    assert not out.exists()


def test_awq_refuses_outputs_that_do_not_pack(tmp_path, capsys):
    folder = str(tmp_path / "model")
    build_tiny("llama", intermediate_size=100).save_pretrained(folder)  # gate/up: 100 outputs, not a multiple of 8
    byte_tokenizer().save_pretrained(folder)
    line = lite_error(capsys, "auto_gptq", folder, "--work-dir", tmp_path / "w", "--format", "awq", "--w-group-size",
                      "4", "--device", "cpu")
    assert "100 outputs" in line and "--format compressed-tensors" in line
    assert not (tmp_path / "w" / "quantized").exists()


def test_asymmetric_packing_is_what_compressed_tensors_itself_writes(folders):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    module = load_checkpoint(folders["ct-asym"]).get_submodule("model.layers.1.mlp.down_proj")
    codes, scale, zero = module.codes()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    # compressed-tensors keeps signed zero points in [-8, 7] in memory and quantizes the weight itself
    theirs = PackedQuantizationCompressor.compress(
        {"weight": module.dequantized_weight(), "weight_scale": scale, "weight_zero_point": (zero - 8).to(torch.int8)},
        QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(theirs["weight_packed"], module.weight_packed)
    assert torch.equal(theirs["weight_zero_point"], module.weight_zero_point)


def test_channel_fallback_writes_two_config_groups_that_transformers_reads(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    folder = str(tmp_path / "model")
    build_tiny("llama", intermediate_size=100).save_pretrained(folder)  # down_proj: 100 inputs, not a multiple of 32
    byte_tokenizer().save_pretrained(folder)
    main(["auto_gptq", folder, "--work-dir", str(tmp_path / "w"), "--w-group-size", "32", "--w-channel-fallback",
          "--calib-dataset", "sample", "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"])
    out = str(tmp_path / "w" / "quantized")
    with open(os.path.join(out, "config.json")) as f:
        groups = json.load(f)["quantization_config"]["config_groups"]
    assert groups["group_1"]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert groups["group_1"]["weights"]["strategy"] == "channel" and groups["group_0"]["weights"]["group_size"] == 32
    assert len(groups["group_0"]["targets"]) == 12
    state = read_state(out)
    assert state["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 1)
    assert state["model.layers.0.mlp.up_proj.weight_scale"].shape == (100, 2)
    tokens = random_tokens(seed=13)
    theirs = logits(AutoModelForCausalLM.from_pretrained(out).eval(), tokens)
    assert relative_difference(logits(load_checkpoint(out), tokens), theirs) < 1e-4


def test_channel_fallback_needs_compressed_tensors(tmp_path, capsys):
    line = lite_error(capsys, "auto_awq", "tiny:llama", "--work-dir", tmp_path / "w", "--w-channel-fallback",
                      "--device", "cpu")
    assert "--w-channel-fallback" in line and "--format compressed-tensors" in line
