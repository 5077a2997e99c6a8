"""The `lite` command end to end, in-process through `lite.cli.main.main`, into temp dirs.

Models are `tiny:<type>` (built by lite itself) and calibration text is the sample lite ships, so
nothing is downloaded.
"""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import arch_of, blocks_of, logits, random_tokens, relative_difference
from lite.cli.main import COMMANDS, main
from lite.data import SAMPLE_TEXT, calibration_tokens
from lite.eval import eval_windows, perplexity
from lite.export import load_quantized
from lite.model import build_tiny, byte_tokenizer
from lite.settings import SmoothSettings
from lite.smooth import migration_scales

CALIB = ["--calib-dataset", "sample", "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]
STATS = {"max", "min", "mean", "absmax", "absmean"}
# A W8A8 tiny model stays within a few percent of its fp32 logits (measured ~0.5%); a broken
# export (wrong scales, unfolded smoothing) is off by tens of percent.
QUANTIZED_LOGITS = 0.03


def lite(*args):
    main([str(a) for a in args])


def load_stats(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # as lmdeploy loads them


def saved(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def block_modules(model, kind):
    """`{fqn: module}` of the nn.Linear (kind "linear") or norm (kind "norm") modules inside the blocks."""
    arch, out = arch_of(model), {}
    for prefix, block in blocks_of(model).items():
        for name, m in block.named_modules():
            if kind == "linear" and isinstance(m, torch.nn.Linear):
                out[f"{prefix}.{name}"] = m
        if kind == "norm":
            out.update({f"{prefix}.{p.norm}": block.get_submodule(p.norm) for p in arch.at(prefix).norm_pairs})
    return out


def test_calibrate_writes_statistics_in_lmdeploy_layout(tmp_path):
    work = tmp_path / "work"

    lite("calibrate", "tiny:phi3", "--work-dir", work, *CALIB)

    model = build_tiny("phi3")
    inputs, outputs = load_stats(work / "inputs_stats.pth"), load_stats(work / "outputs_stats.pth")
    assert set(inputs) == STATS and set(outputs) == STATS
    linears, norms = block_modules(model, "linear"), block_modules(model, "norm")
    for stat in STATS:
        assert set(inputs[stat]) == set(linears)
        assert set(outputs[stat]) == set(linears) | set(norms)
        for fqn, linear in linears.items():
            assert inputs[stat][fqn].dtype == torch.float32
            assert inputs[stat][fqn].shape == (linear.in_features,)
            assert outputs[stat][fqn].shape == (linear.out_features,)
        for fqn, norm in norms.items():
            assert outputs[stat][fqn].shape == norm.weight.shape
    for table in (inputs, outputs):
        for fqn in table["absmax"]:
            s = {k: table[k][fqn] for k in STATS}
            assert (s["min"] <= s["mean"]).all() and (s["mean"] <= s["max"]).all()
            assert (s["absmean"] <= s["absmax"]).all() and (s["mean"].abs() <= s["absmean"] + 1e-6).all()
            assert torch.equal(s["absmax"], torch.maximum(s["max"].abs(), s["min"].abs()))
    manifest = json.loads((work / "lite_manifest.json").read_text())
    assert manifest["artifacts"]["statistics"]["calib_samples"] == 4
    assert manifest["model"]["source"] == "tiny:phi3"


def test_statistics_are_reduced_over_all_tokens_with_means_weighted_by_count(tmp_path):
    """5 windows in batches of 2, 2, 1: lmdeploy's per-call average of means would weight the last
    window twice; lite's means must equal the mean over all tokens, computed here with plain hooks on
    the whole model (not the layer-wise runner)."""
    work = tmp_path / "work"
    lite("calibrate", "tiny:llama", "--work-dir", work, "--calib-dataset", "sample", "--calib-samples", 5,
         "--calib-seqlen", 64, "--batch-size", 2, "--device", "cpu")
    stats = load_stats(work / "inputs_stats.pth")

    model = build_tiny("llama")
    windows = calibration_tokens(byte_tokenizer(), "sample", 5, 64, seed=0)
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, o, fqn=fqn: seen.setdefault(fqn, []).append(a[0].detach()))
               for fqn, m in block_modules(model, "linear").items()]
    with torch.no_grad():
        for batch in windows.split(2):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()

    assert set(seen) == set(stats["mean"])
    for fqn, calls in seen.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in calls])  # (5 * 64 tokens, channels)
        expected = {"max": x.amax(0), "min": x.amin(0), "mean": x.mean(0), "absmax": x.abs().amax(0),
                    "absmean": x.abs().mean(0)}
        for stat, value in expected.items():
            torch.testing.assert_close(stats[stat][fqn], value, rtol=1e-4, atol=1e-5, msg=f"{stat} of {fqn}")
        per_call = torch.stack([c.reshape(-1, c.shape[-1]).mean(0) for c in calls]).mean(0)
        assert not torch.allclose(per_call, expected["mean"], rtol=1e-4, atol=1e-5), "the check cannot tell"


def test_calibrate_smooth_export_fold_the_scales_into_the_checkpoint(tmp_path):
    work = tmp_path / "work"

    lite("calibrate", "tiny:gemma", "--work-dir", work, *CALIB)
    lite("smooth", "tiny:gemma", "--work-dir", work, "--alpha", 0.8, "--w-stat", "absmax", *CALIB)
    lite("export", "tiny:gemma", "--work-dir", work)

    model = build_tiny("gemma")
    stats = load_stats(work / "inputs_stats.pth")
    scales = load_stats(work / "migration_scales.pth")
    expected = migration_scales(blocks_of(model), arch_of(model), model.config, stats["absmax"], 0.8, "absmax")
    assert set(scales) == set(expected)
    for fqn, s in expected.items():
        torch.testing.assert_close(scales[fqn], s, rtol=0, atol=0)
    out = work / "quantized"
    tensors = saved(out)
    s = scales["model.layers.1.mlp.gate_proj"]
    norm = model.get_submodule("model.layers.1.post_attention_layernorm").weight.detach()
    torch.testing.assert_close(1 + tensors["model.layers.1.post_attention_layernorm.weight"], (1 + norm) / s)
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(os.listdir(out))
    tokens = random_tokens()
    reloaded = load_quantized(str(out))
    assert relative_difference(logits(reloaded, tokens), logits(model, tokens)) < QUANTIZED_LOGITS


def test_export_without_scales_to_an_out_dir_elsewhere(tmp_path):
    """Plain round-to-nearest W8A8: no migration_scales.pth, so the norms keep their weights; the
    work dir is created for the manifest even though the checkpoint goes elsewhere."""
    work, out = tmp_path / "work", tmp_path / "elsewhere" / "rtn"

    lite("export", "tiny:qwen2", "--work-dir", work, "--out-dir", out)

    model = build_tiny("qwen2")
    tensors = saved(out)
    for fqn, norm in block_modules(model, "norm").items():
        assert torch.equal(tensors[f"{fqn}.weight"], norm.weight.detach())
    manifest = json.loads((work / "lite_manifest.json").read_text())
    assert manifest["artifacts"]["export"]["out_dir"] == str(out) and not manifest["artifacts"]["export"]["smoothed"]
    tokens = random_tokens()
    assert relative_difference(logits(load_quantized(str(out)), tokens), logits(model, tokens)) < QUANTIZED_LOGITS


def test_smooth_calibrates_first_when_statistics_are_missing(tmp_path):
    work = tmp_path / "work"

    lite("smooth", "tiny:qwen3", "--work-dir", work, *CALIB)

    assert (work / "inputs_stats.pth").is_file() and (work / "migration_scales.pth").is_file()
    manifest = json.loads((work / "lite_manifest.json").read_text())
    # The CLI's default alpha is the library's, and the manifest records the one used.
    default_alpha = inspect.signature(COMMANDS["smooth"]).parameters["alpha"].default
    assert default_alpha == SmoothSettings().alpha
    assert manifest["artifacts"]["migration_scales"]["alpha"] == default_alpha


def test_smooth_quant_with_migration_scales(tmp_path):
    work = tmp_path / "work"

    lite("smooth_quant", "tiny:llama", "--work-dir", work, "--export-migration-scale", *CALIB)

    out = work / "quantized"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "smooth_quant", "quant_dtype": "int8", "migration_scale": True}
    scales, tensors = load_stats(work / "migration_scales.pth"), saved(out)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        fqn = f"model.layers.0.self_attn.{name}"
        assert torch.equal(tensors[f"{fqn}.migration_scale"], scales[fqn])
    model = build_tiny("llama")
    assert torch.equal(tensors["model.layers.0.input_layernorm.weight"],
                       model.get_submodule("model.layers.0.input_layernorm").weight.detach())
    tokens = random_tokens()
    assert relative_difference(logits(load_quantized(str(out)), tokens), logits(model, tokens)) < QUANTIZED_LOGITS


def test_smooth_quant_fp8(tmp_path):
    work, out = tmp_path / "work", tmp_path / "fp8"

    lite("smooth_quant", "tiny:mistral", "--work-dir", work, "--quant-dtype", "fp8", "--out-dir", out, *CALIB)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "smooth_quant", "quant_dtype": "float8_e4m3fn"}
    tensors = saved(out)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    tokens = random_tokens()
    model = build_tiny("mistral")
    assert relative_difference(logits(load_quantized(str(out)), tokens), logits(model, tokens)) < QUANTIZED_LOGITS
    assert not (work / "quantized").exists()


def test_smooth_quant_reuses_matching_artifacts_and_redoes_stale_ones(tmp_path):
    work = tmp_path / "work"
    stats, scales = work / "inputs_stats.pth", work / "migration_scales.pth"
    lite("smooth_quant", "tiny:qwen2", "--work-dir", work, *CALIB)
    old = 1_000_000_000_000_000_000  # an mtime no fresh write can have
    for path in (stats, scales):
        os.utime(path, ns=(old, old))

    lite("smooth_quant", "tiny:qwen2", "--work-dir", work, *CALIB)
    assert stats.stat().st_mtime_ns == old and scales.stat().st_mtime_ns == old

    lite("smooth_quant", "tiny:qwen2", "--work-dir", work, "--alpha", 0.7, *CALIB)
    assert stats.stat().st_mtime_ns == old, "statistics do not depend on alpha and must be reused"
    assert scales.stat().st_mtime_ns != old

    before = load_stats(stats)["absmax"]
    lite("smooth_quant", "tiny:qwen2", "--work-dir", work, *CALIB[:2], "--calib-samples", 6, *CALIB[4:])
    assert stats.stat().st_mtime_ns != old
    manifest = json.loads((work / "lite_manifest.json").read_text())
    assert manifest["artifacts"]["statistics"]["calib_samples"] == 6
    after = load_stats(stats)["absmax"]
    assert any(not torch.equal(before[k], after[k]) for k in before), "recalibration saw the same tokens"


def test_eval_reports_perplexity_of_float_and_quantized_models(tmp_path):
    work, report = tmp_path / "work", tmp_path / "ppl.json"
    lite("smooth_quant", "tiny:llama", "--work-dir", work, *CALIB)

    lite("eval", "tiny:llama", work / "quantized", "--dataset", "sample", "--seqlen", 64, "--max-windows", 8,
         "--device", "cpu", "--json-out", report)

    rows = json.loads(report.read_text())
    assert [r["windows"] for r in rows] == [8, 8]
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        windows, _ = eval_windows(byte_tokenizer(), f.read(), 64, 8)
    expected = perplexity(build_tiny("llama"), windows, progress=False)
    assert rows[0]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert rows[0]["relative_change_pct"] == 0
    assert "smooth_quant" in rows[1]["quantization"]
    assert abs(rows[1]["relative_change_pct"]) < 1.0  # W8A8 of a random model moves perplexity ~0.1%
    assert rows[1]["perplexity"] != rows[0]["perplexity"]


def test_console_script_shows_the_flags_of_smooth_quant():
    script = Path(sys.executable).with_name("lite")
    assert script.is_file(), f"the console script is not installed next to {sys.executable}"

    result = subprocess.run([str(script), "smooth_quant", "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PAGER": "cat"})

    assert result.returncode == 0, result.stderr
    text = result.stdout
    for flag in ("work-dir", "quant-dtype", "export-migration-scale", "alpha", "w-stat", "calib-dataset",
                 "calib-samples", "calib-seqlen", "batch-size", "seed", "max-shard-size", "out-dir", "device",
                 "dtype", "trust-remote-code", "verbose"):
        assert f"    --{flag}" in text, f"--{flag} missing from `lite smooth_quant --help`"
    assert "--work_dir" not in text and "…" not in text and "..." not in text.split("flags:")[1]
    # Descriptions are whole: the last words of a long docstring entry are there.
    assert "at alpha 0, s = 1 / w still rescales every channel by its weight statistic." in " ".join(text.split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_is_documented_in_the_docstring(command):
    """--help is built from the Google-style docstring: each parameter needs an `Args:` entry."""
    function = COMMANDS[command]
    doc = inspect.getdoc(function)
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""

    for name in inspect.signature(function).parameters:
        assert re.search(rf"^\s*{name}:", args, re.MULTILINE), f"`lite {command}`: {name} is not documented"
