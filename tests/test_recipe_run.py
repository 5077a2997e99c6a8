"""`lite run RECIPE MODEL`: step recipes from the registry, checked before any work."""

import json
from pathlib import Path

import pytest
import torch

from helpers import lite_error
from lite.cli.main import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "recipes"
CALIB = ["--calib-dataset", "sample", "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]


def write(path, text: str):
    path.write_text(text)
    return path


def weights(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith((".safetensors", ".json"))
            and p.name != "lite_output.json"}


def test_smoothquant_rtn_recipe_writes_what_smooth_quant_writes(tmp_path):
    recipe = write(tmp_path / "r.yaml", "steps: [{smoothquant: {alpha: 0.5}}, {rtn: {quant_dtype: int8}}]\n"
                                        "format: lmdeploy\n")
    main(["run", str(recipe), "tiny:qwen2", "--work-dir", str(tmp_path / "a"), *CALIB])
    main(["smooth_quant", "tiny:qwen2", "--work-dir", str(tmp_path / "b"), *CALIB, "--alpha", "0.5",
          "--batch-size", "4"])

    assert weights(tmp_path / "a" / "quantized") == weights(tmp_path / "b" / "quantized")
    record = json.loads((tmp_path / "a" / "lite_manifest.json").read_text())["artifacts"]["export"]
    assert record["steps"] == [["smoothquant", {"alpha": 0.5}], ["rtn", {"quant_dtype": "int8"}]]


def test_rotation_recipe_writes_a_static_checkpoint_that_reads_back(tmp_path):
    main(["run", str(CONFIGS / "w8a8-int8-rotate-static.yaml"), "tiny:llama", "--work-dir", str(tmp_path / "w"), *CALIB])

    config = json.loads((tmp_path / "w" / "quantized" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["tie_word_embeddings"] is False  # rotation unties lm_head from the embeddings
    marker = json.loads((tmp_path / "w" / "quantized" / "lite_output.json").read_text())
    assert [name for name, _ in marker["export"]["steps"]] == ["fuse_norms", "rotate", "smoothquant",
                                                              "static_scales", "rtn"]


@pytest.mark.parametrize("text, expected", [
    ("steps: [rtn]\nformats: lmdeploy\n", "unknown key 'formats'; allowed: description, data, steps, format"),
    ("data: {samples: 4}\nsteps: [rtn]\n", "unknown data key 'samples'"),
    ("steps: [gptx, rtn]\n", "unknown step 'gptx'; registered steps:"),
    ("steps: [smoothquant, gptq]\nformat: gptq\n", "transforms, optionally awq, then its quantizing step"),
    ("steps: [gptq]\nformat: lmdeploy\n", "weight-only steps write format compressed-tensors, awq or gptq"),
    ("steps: [{gptq: {bits: 9}}]\n", "--w-bits must be an integer from 2 to 8"),
    ("steps: [awq, {rtn: {bits: 4}}]\n", "give both the same bits, group_size and symmetric"),
    ("steps: [{smoothquant: {alfa: 0.5}}, rtn]\n", "step 'smoothquant' has no setting 'alfa'"),
    ("steps: [{smoothquant: {alpha: 2}}, rtn]\n", "--alpha must be auto or lie in [0, 1]"),
    ("steps: [smoothquant]\n", "must end with rtn"),
    ("steps: [smoothquant, fuse_norms, rtn]\n", "transforms (fuse_norms, rotate, center_embeddings) come before"),
    ("steps: [rotate, rtn]\n", "rotate needs fuse_norms before it"),
    ("steps: [static_scales, rtn]\nformat: lmdeploy\n", "static_scales needs format: compressed-tensors"),
    ("steps: [rtn]\nformat: gguf\n", "format 'gguf' is not one of"),
])
def test_bad_recipes_are_refused_before_any_work(tmp_path, capsys, text, expected):
    recipe = write(tmp_path / "bad.yaml", text)

    message = lite_error(capsys, "run", recipe, "tiny:llama", "--work-dir", tmp_path / "w", *CALIB)

    assert expected in message and str(recipe) in message
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", ["w8a8-int8.yaml", "w8a8-int8-static.yaml", "w8a8-int8-vllm.yaml", "w8a8-fp8.yaml",
                                  "w8a8-int8-rotate-static.yaml", "w4a16-gptq.yaml", "w4a16-rtn.yaml",
                                  "w4a16-awq.yaml", "w4a16-awq-gptq.yaml", "w8a8-int8-gptq.yaml"])
def test_shipped_recipes_are_valid(name):
    from lite.recipe import load

    recipe = load(str(CONFIGS / name))
    assert recipe.steps[-1][0] in ("rtn", "gptq") and recipe.description
    assert recipe.weight_only == name.startswith("w4a16")
    assert recipe.steps[-1][0] == "rtn" or name.endswith("gptq.yaml")


def test_weight_only_recipe_matches_auto_gptq(tmp_path):
    """A gptq recipe and `lite auto_gptq` with the same settings write the same tensors."""
    recipe = write(tmp_path / "gptq.yaml", "steps:\n  - gptq: {bits: 4, group_size: 32, symmetric: false, "
                                           "act_order: true, mse: true}\nformat: compressed-tensors\n")
    main(["run", str(recipe), "tiny:llama", "--work-dir", str(tmp_path / "a"), *CALIB])
    main(["auto_gptq", "tiny:llama", "--work-dir", str(tmp_path / "b"), "--w-group-size", "32", "--w-sym", "false",
          "--batch-size", "4", *CALIB])
    assert weights(tmp_path / "a" / "quantized") == weights(tmp_path / "b" / "quantized")
    record = json.loads((tmp_path / "a" / "lite_manifest.json").read_text())["artifacts"]["export"]
    assert record["steps"][-1][0] == "gptq" and record["recipe"] == "gptq.yaml"


def test_weight_only_rtn_recipe_is_worse_than_gptq_on_the_calibration_loss(tmp_path):
    """GPTQ minimizes each linear's output error on the calibration data: the whole model's output moves
    less from the float one than with round to nearest at the same settings."""
    from helpers import logits
    from lite.data import calibration_tokens
    from lite.formats import load_checkpoint
    from lite.model import build_tiny, byte_tokenizer

    for name, step in (("rtn", "rtn"), ("gptq", "gptq")):
        recipe = write(tmp_path / f"{name}.yaml", f"steps:\n  - {step}: {{bits: 3, group_size: -1, symmetric: false}}"
                                                  "\nformat: compressed-tensors\n")
        main(["run", str(recipe), "tiny:llama", "--work-dir", str(tmp_path / name), *CALIB])
    tokens = calibration_tokens(byte_tokenizer(), "sample", 4, 64, 0)  # the calibration windows (CALIB)
    reference = logits(build_tiny("llama"), tokens)
    error = {name: (logits(load_checkpoint(str(tmp_path / name / "quantized")), tokens) - reference).pow(2).mean()
             for name in ("rtn", "gptq")}
    assert error["gptq"] < 0.8 * error["rtn"], error


def test_w8a8_with_gptq_rounding_beats_round_to_nearest_on_the_calibration_windows(tmp_path):
    """[smoothquant, gptq{quant_dtype: int8}] writes the same lmdeploy layout as the default recipe, with
    the int8 codes chosen by GPTQ: closer to the float model on the data it saw."""
    from helpers import logits
    from lite.data import calibration_tokens
    from lite.formats import load_checkpoint
    from lite.model import build_tiny, byte_tokenizer

    main(["run", str(CONFIGS / "w8a8-int8-gptq.yaml"), "tiny:llama", "--work-dir", str(tmp_path / "gptq"), *CALIB])
    main(["run", str(CONFIGS / "w8a8-int8.yaml"), "tiny:llama", "--work-dir", str(tmp_path / "rtn"), *CALIB])
    gptq_state = {n: t for n, t in read_state(tmp_path / "gptq" / "quantized").items()}
    rtn_state = {n: t for n, t in read_state(tmp_path / "rtn" / "quantized").items()}
    assert sorted(gptq_state) == sorted(rtn_state)  # the same tensors: QLinear weight/scale, QRMSNorm weights
    assert gptq_state["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    tokens = calibration_tokens(byte_tokenizer(), "sample", 4, 64, 0)
    reference = logits(build_tiny("llama"), tokens)
    error = {name: (logits(load_checkpoint(str(tmp_path / name / "quantized")), tokens) - reference).pow(2).mean()
             for name in ("rtn", "gptq")}
    assert error["gptq"] < 0.8 * error["rtn"], error


def read_state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
