"""Bad input: a one-line message naming the problem, exit code 2, and no half-written output.

Each case is crafted so that the check it names is the one that fires (e.g. a foreign statistics
file without a manifest reaches the statistics check; with a manifest, the manifest check fires).
"""

import json
import os
import time

import pytest
import torch

from helpers import arch_of, leftovers, lite_error, random_tokens, save_tiny, sha256
from lite.archs import ARCHS
from lite.steps.stats import collect_statistics
from lite.cli.main import main
from lite.errors import LiteError
from lite.export import load_quantized, quantize_model_, write_checkpoint
from lite.model import build_tiny, byte_tokenizer

CALIB = ["--calib-dataset", "sample", "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]


def stats_of(model) -> dict:
    inputs, _ = collect_statistics(model, arch_of(model), random_tokens(2, 16), batch_size=2, device="cpu",
                                   progress=False)
    return inputs


def test_missing_model_path(tmp_path, capsys):
    work = tmp_path / "work"

    message = lite_error(capsys, "calibrate", tmp_path / "no-such-model", "--work-dir", work, *CALIB)

    assert "no-such-model" in message and "does not exist" in message
    assert not work.exists()


def test_folder_that_is_not_a_model(tmp_path, capsys):
    folder, work = tmp_path / "notes", tmp_path / "work"
    folder.mkdir()
    (folder / "README.md").write_text("not a model")

    message = lite_error(capsys, "smooth_quant", folder, "--work-dir", work, *CALIB)

    assert str(folder) in message and "config.json" in message
    assert not work.exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder, work = tmp_path / "gpt2", tmp_path / "work"
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)

    message = lite_error(capsys, "smooth_quant", folder, "--work-dir", work, *CALIB)

    assert "'gpt2'" in message and "not supported" in message
    assert all(model_type in message for model_type in ARCHS)
    assert not work.exists()


@pytest.mark.parametrize("foreign", ["narrower model", "fewer layers"])
def test_statistics_without_a_record_are_recomputed_not_trusted(tmp_path, capsys, foreign):
    """A statistics file lite has no record of (copied in, or left by a run killed before the manifest
    write) is never used: lite says so in one line, calibrates again and records the truth."""
    work = tmp_path / "work"
    work.mkdir()
    other = (build_tiny("qwen2", hidden_size=32, intermediate_size=48, head_dim=4) if foreign == "narrower model"
             else build_tiny("llama", num_hidden_layers=1))
    torch.save(stats_of(other), work / "inputs_stats.pth")

    main(["smooth", "tiny:llama", "--work-dir", str(work), *CALIB])

    out = capsys.readouterr().out
    assert "inputs_stats.pth has no record" in out and "calibrating again" in out
    stats = torch.load(work / "inputs_stats.pth", weights_only=True)
    assert stats["absmax"]["model.layers.1.mlp.down_proj"].shape == (96,)
    manifest = json.loads((work / "lite_manifest.json").read_text())
    assert manifest["artifacts"]["statistics"]["calib_samples"] == 4
    assert manifest["artifacts"]["statistics"]["files"]["inputs_stats.pth"] == sha256(work / "inputs_stats.pth")


def test_work_dir_of_another_model(tmp_path, capsys):
    """With a manifest, the model identity is checked before any artifact is read."""
    work = tmp_path / "work"
    main(["calibrate", "tiny:qwen2", "--work-dir", str(work), *CALIB])
    before = {p.name: p.read_bytes() for p in work.iterdir()}

    message = lite_error(capsys, "smooth_quant", "tiny:llama", "--work-dir", work, *CALIB)

    assert "another model" in message and "tiny:qwen2" in message
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_weights_names_module_and_channel(tmp_path, capsys, bad):
    folder, work = tmp_path / "model", tmp_path / "work"
    model = build_tiny("llama")
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.down_proj").weight[5, 7] = bad
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)

    message = lite_error(capsys, "export", folder, "--work-dir", work)

    assert "model.layers.1.mlp.down_proj" in message and "channel 7" in message and str(bad) in message
    assert not (work / "quantized").exists()
    assert leftovers(tmp_path) == []


def test_nan_weights_caught_while_calibrating(tmp_path, capsys):
    folder, work = tmp_path / "model", tmp_path / "work"
    model = build_tiny("llama")
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.down_proj").weight[5, 7] = float("nan")
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)

    message = lite_error(capsys, "smooth_quant", folder, "--work-dir", work, *CALIB)

    assert "model.layers.1.mlp.down_proj" in message and "channel" in message and "nan" in message
    assert not work.exists() or not any(p.suffix == ".pth" for p in work.iterdir())
    assert leftovers(tmp_path) == []


def test_statistics_changed_since_lite_wrote_them_are_recomputed(tmp_path, capsys):
    """Statistics made by lite with the same settings, then edited (a NaN written in): their hash no longer
    matches the record, so they are made again instead of being used."""
    work = tmp_path / "work"
    main(["calibrate", "tiny:llama", "--work-dir", str(work), *CALIB])
    original = (work / "inputs_stats.pth").read_bytes()
    stats = torch.load(work / "inputs_stats.pth", weights_only=True)
    stats["absmax"]["model.layers.0.mlp.down_proj"][11] = float("nan")
    torch.save(stats, work / "inputs_stats.pth")
    capsys.readouterr()

    main(["smooth", "tiny:llama", "--work-dir", str(work), *CALIB])

    assert "changed since lite wrote them; calibrating again" in capsys.readouterr().out
    assert (work / "inputs_stats.pth").read_bytes() == original  # made again, byte for byte
    assert torch.isfinite(torch.load(work / "migration_scales.pth", weights_only=True)[
        "model.layers.0.mlp.down_proj"]).all()


def test_calibration_text_too_short(tmp_path, capsys):
    text, work = tmp_path / "short.txt", tmp_path / "work"
    text.write_text("Once upon a time there was a tiny model.")

    message = lite_error(capsys, "calibrate", "tiny:llama", "--work-dir", work, "--calib-dataset", text,
                         "--calib-samples", 4, "--calib-seqlen", 64, "--device", "cpu")

    assert "calibration text" in message and "4 × 64" in message
    assert not work.exists()


def test_work_dir_holding_an_unrelated_checkpoint(tmp_path, capsys):
    work = tmp_path / "work"
    save_tiny(work, "qwen3")
    before = {p.name: p.read_bytes() for p in work.iterdir()}

    message = lite_error(capsys, "smooth_quant", "tiny:llama", "--work-dir", work, *CALIB)

    assert str(work) in message and "checkpoint" in message
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before


def test_out_dir_not_written_by_lite_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    message = lite_error(capsys, "export", "tiny:llama", "--work-dir", tmp_path / "work", "--out-dir", out)

    assert str(out) in message
    assert os.listdir(out) == ["notes.txt"]


@pytest.mark.parametrize("flag, value, expected", [
    ("--quant-dtype", "int4", ["int8", "fp8"]),
    ("--w-stat", "median", ["lmdeploy", "absmax"]),
    ("--alpha", "1.5", ["[0, 1]"]),
    ("--alpha", "best", ["auto", "[0, 1]"]),
    ("--calib-dataset", "no-such-dataset", ["wikitext2", "sample"]),
    ("--dtype", "float64", ["float32", "bfloat16"]),
])
def test_bad_flag_values_list_the_choices(tmp_path, capsys, flag, value, expected):
    work = tmp_path / "work"
    args = list(CALIB)
    if flag in args:
        i = args.index(flag)
        del args[i:i + 2]

    message = lite_error(capsys, "smooth_quant", "tiny:llama", "--work-dir", work, *args, flag, value)

    assert value in message and all(choice in message for choice in expected)
    assert not (work / "quantized").exists() and leftovers(tmp_path) == []
    # Refused up front, before any calibration work.
    assert not (work / "inputs_stats.pth").exists()


class FailingTokenizer:
    """Fails after the weights and config.json are already in the temporary folder."""

    def save_pretrained(self, folder):
        raise OSError("No space left on device")


def test_failed_write_leaves_no_folder_and_keeps_the_previous_export(tmp_path):
    model = quantize_model_(build_tiny("llama"), "int8", None, False, progress=False)
    out = tmp_path / "quantized"

    with pytest.raises(OSError, match="No space"):
        write_checkpoint(model, FailingTokenizer(), None, str(out))
    assert not out.exists() and leftovers(tmp_path) == []

    write_checkpoint(model, byte_tokenizer(), None, str(out))
    complete = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OSError, match="No space"):
        write_checkpoint(model, FailingTokenizer(), None, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == complete
    assert leftovers(tmp_path) == []


def test_loading_a_float_folder_as_quantized_is_a_lite_error(tmp_path):
    save_tiny(tmp_path / "float")

    with pytest.raises(LiteError, match="not a smooth_quant checkpoint"):
        load_quantized(str(tmp_path / "float"))
    with pytest.raises(LiteError, match="no config.json"):
        load_quantized(str(tmp_path))


# ---------------------------------------------------------------------------- bad inputs of issue 8

def broken_safetensors(folder, how: str) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "random": os.urandom(4096), "bad header": (40).to_bytes(8, "little") + b"{" * 40}[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "bad header"])
@pytest.mark.parametrize("command", ["smooth_quant", "eval"])
def test_broken_safetensors_file(tmp_path, capsys, how, command):
    folder, work = tmp_path / "model", tmp_path / "work"
    save_tiny(folder)
    broken_safetensors(folder, how)
    args = ["--work-dir", work, *CALIB] if command == "smooth_quant" else ["--dataset", "sample", "--device", "cpu"]

    message = lite_error(capsys, command, folder, *args)

    assert "model.safetensors" in message and "re-download" in message
    assert not work.exists()


@pytest.mark.parametrize("model_type", [None, "no-such-type"])
def test_config_without_a_known_model_type(tmp_path, capsys, model_type):
    folder, work = tmp_path / "model", tmp_path / "work"
    save_tiny(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("model_type")
    if model_type:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))

    message = lite_error(capsys, "smooth_quant", folder, "--work-dir", work, *CALIB)

    assert "config.json" in message and "llama" in message
    assert not work.exists()


def test_missing_tokenizer_files(tmp_path, capsys):
    folder, work = tmp_path / "model", tmp_path / "work"
    save_tiny(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()

    message = lite_error(capsys, "smooth_quant", folder, "--work-dir", work, *CALIB)

    assert "no usable tokenizer" in message and "sentencepiece" not in message
    assert not work.exists()


@pytest.mark.parametrize("name, content, expected", [
    ("latin1.txt", "Once upon a time, café".encode("latin-1") * 400, "not UTF-8"),
    ("rows.jsonl", b'{"text": "fine"}\n{not json}\n', "line 2 is not JSON"),
    ("rows.jsonl", b'{"text": "fine"}\n["a list"]\n', "line 2 has no 'text'"),
    ("table.parquet", b"PAR1 but not really a parquet file", "could not be read as parquet"),
    ("notes.docx", b"whatever", "unsupported text file type"),
])
def test_malformed_calibration_files(tmp_path, capsys, name, content, expected):
    text, work = tmp_path / name, tmp_path / "work"
    text.write_bytes(content)

    message = lite_error(capsys, "calibrate", "tiny:llama", "--work-dir", work, "--calib-dataset", text,
                         "--calib-samples", 2, "--calib-seqlen", 16, "--device", "cpu")

    assert str(text) in message and expected in message
    assert not work.exists()


def test_default_dataset_unreachable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = lite_error(capsys, "calibrate", "tiny:llama", "--work-dir", tmp_path / "work", "--calib-samples", 2,
                         "--calib-seqlen", 16, "--device", "cpu")
    assert "wikitext" in message and "--calib-dataset" in message and "sample" in message


def test_work_dir_that_is_a_file(tmp_path, capsys):
    work = tmp_path / "work"
    work.write_text("a file")
    message = lite_error(capsys, "calibrate", "tiny:llama", "--work-dir", work, *CALIB)
    assert "is a file" in message and work.read_text() == "a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_work_dir_is_refused_before_calibrating(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o555)
    try:
        message = lite_error(capsys, "calibrate", "tiny:llama", "--work-dir", work, *CALIB)
    finally:
        work.chmod(0o755)
    assert "not writable" in message and os.listdir(work) == []


def test_not_enough_disk_space_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    work = tmp_path / "work"

    message = lite_error(capsys, "smooth_quant", "tiny:llama", "--work-dir", work, *CALIB)

    assert "not enough free disk space" in message and "1000" not in message and "GB free" in message
    assert not work.exists()


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    from lite import shards

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "_pwrite_all", full)
    work = tmp_path / "work"

    message = lite_error(capsys, "smooth_quant", "tiny:llama", "--work-dir", work, *CALIB)

    assert "disk is full" in message
    assert not (work / "quantized").exists() and leftovers(tmp_path) == []


def test_corrupt_manifest(tmp_path, capsys):
    work = tmp_path / "work"
    main(["calibrate", "tiny:llama", "--work-dir", str(work), *CALIB])
    (work / "lite_manifest.json").write_text('{"model": ')

    message = lite_error(capsys, "smooth", "tiny:llama", "--work-dir", work, *CALIB)

    assert "lite_manifest.json is corrupt" in message and "delete it" in message


@pytest.mark.parametrize("path", ["./no-such-model", "models/mistyped-name"])
def test_mistyped_local_path_is_not_tried_on_the_hub(tmp_path, capsys, monkeypatch, path):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()

    message = lite_error(capsys, "smooth_quant", path, "--work-dir", tmp_path / "work", *CALIB)

    assert path in message and "does not exist" in message
    assert time.perf_counter() - start < 20  # no hub retries (they took ~23 s)


def test_calib_seqlen_beyond_the_models_positions(tmp_path, capsys):
    message = lite_error(capsys, "smooth_quant", "tiny:llama", "--work-dir", tmp_path / "work",
                         "--calib-dataset", "sample", "--calib-samples", 1, "--calib-seqlen", 2048, "--device", "cpu")
    assert "--calib-seqlen 2048" in message and "max_position_embeddings (512)" in message
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "loaded"])
def test_nan_in_an_embedding_row(tmp_path, capsys, streamed):
    folder, work = tmp_path / "model", tmp_path / "work"
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[77, 3] = float("nan")
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    args = ["smooth_quant", folder, "--work-dir", work, *CALIB]
    if not streamed:
        args += ["--format", "compressed-tensors"]  # loads the model

    message = lite_error(capsys, *args)

    assert "model.embed_tokens.weight" in message and "row 77" in message and "nan" in message
    assert not (work / "quantized").exists() and leftovers(tmp_path) == []


def test_inf_in_q_proj_is_named_q_proj(tmp_path, capsys):
    """The defect: the forward ran before the check, and the Inf surfaced later under gate_proj."""
    folder, work = tmp_path / "model", tmp_path / "work"
    model = build_tiny("llama")
    with torch.no_grad():
        model.get_submodule("model.layers.0.self_attn.q_proj").weight[2, 5] = float("inf")
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)

    message = lite_error(capsys, "smooth_quant", folder, "--work-dir", work, *CALIB)

    assert "model.layers.0.self_attn.q_proj" in message and "inf" in message


def test_export_without_scales_says_so(tmp_path, capsys):
    main(["export", "tiny:llama", "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert "no migration_scales.pth" in out and "without SmoothQuant" in out
    capsys.readouterr()
    main(["export", "tiny:llama", "--work-dir", str(tmp_path / "work"), "--no-smooth"])
    assert "without SmoothQuant" not in capsys.readouterr().out


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "loaded"])
def test_a_record_that_does_not_fit_the_model_is_one_line(tmp_path, capsys, monkeypatch, streamed):
    """A family given the wrong record (here llama blocks read with phi3's packed names): lite names the
    mismatch before any work instead of failing with a KeyError inside a stage."""
    from lite import archs

    monkeypatch.setitem(archs.ARCHS, "llama", archs.ARCHS["phi3"])
    folder, work = tmp_path / "model", tmp_path / "work"
    save_tiny(folder, "llama")
    args = ["smooth_quant", folder, "--work-dir", work, *CALIB] + ([] if streamed else ["--alpha", "auto"])

    message = lite_error(capsys, *args)

    assert "does not fit this model" in message and "'llama'" in message and "self_attn.qkv_proj" in message
    assert not (work / "quantized").exists() and not (work / "inputs_stats.pth").exists()


def test_checkpoint_names_transformers_maps_at_load_time_are_loaded_not_streamed(tmp_path, monkeypatch):
    """exaone's checkpoint keys differ from its modules' names (transformers renames them when loading):
    such a folder goes through transformers' loader instead of ending in a KeyError."""
    from lite import archs

    monkeypatch.setitem(archs.ARCHS, "exaone", archs.ARCHS["llama"])
    folder, work = tmp_path / "model", tmp_path / "work"
    save_tiny(folder, "exaone")

    main(["smooth_quant", str(folder), "--work-dir", str(work), *CALIB])

    assert (work / "quantized" / "config.json").is_file()


@pytest.mark.parametrize("fmt", ["lmdeploy", "compressed-tensors"])
def test_a_quantized_checkpoint_given_as_the_model_is_refused(tmp_path, capsys, fmt):
    """A checkpoint lite (or another tool) already quantized is not a float model to start from."""
    main(["smooth_quant", "tiny:llama", "--work-dir", str(tmp_path / "w"), "--format", fmt, *CALIB])
    capsys.readouterr()
    quantized, work = tmp_path / "w" / "quantized", tmp_path / "again"

    message = lite_error(capsys, "smooth_quant", quantized, "--work-dir", work, *CALIB)

    assert "already quantized" in message and "float" in message
    assert not work.exists()
