"""What lite promises about a user's files (README, "Safety"): output folders, honest reuse, strict
flags, the work-dir lock, debris of dead runs. Each test reproduces a defect of issue 8."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import leftovers, lite_error, save_tiny, sha256
from lite.cli.main import main
from lite.folders import MARKER
from lite.workdir import locked_work_dir

CALIB = ["--calib-dataset", "sample", "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(work) -> dict:
    return json.loads((work / "lite_manifest.json").read_text())


# ---------------------------------------------------------------------------- output folders

def test_out_dir_of_foreign_files_is_refused_even_after_an_export(tmp_path, capsys):
    """The defect: once the work dir had exported, any existing --out-dir was replaced (exit code 0)."""
    work, notes = tmp_path / "work", tmp_path / "notes"
    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *CALIB])
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    before = snapshot(tmp_path)

    message = lite_error(capsys, "export", "tiny:llama", "--work-dir", work, "--out-dir", notes)

    assert str(notes) in message and "not written by lite" in message and "--out-dir" in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["model folder", "work dir", "parent of the work dir"])
def test_out_dir_on_the_model_or_the_work_dir_is_refused(tmp_path, capsys, target):
    model, work = tmp_path / "model", tmp_path / "jobs" / "work"
    save_tiny(model)
    main(["smooth_quant", str(model), "--work-dir", str(work), *CALIB])
    out = {"model folder": model, "work dir": work, "parent of the work dir": tmp_path / "jobs"}[target]
    before = snapshot(tmp_path)

    message = lite_error(capsys, "export", model, "--work-dir", work, "--out-dir", out)

    assert "--out-dir" in message and ("the model folder" if target == "model folder" else "the work dir") in message
    assert snapshot(tmp_path) == before


def test_own_output_is_replaced_and_marked(tmp_path):
    work = tmp_path / "work"
    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *CALIB])
    first = snapshot(work / "quantized")
    marker = json.loads((work / "quantized" / MARKER).read_text())
    assert marker["work_dir"] == str(work) and marker["export"]["quant_dtype"] == "int8"

    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *CALIB, "--quant-dtype", "fp8"])

    second = json.loads((work / "quantized" / MARKER).read_text())
    assert second["export"]["quant_dtype"] == "fp8" and snapshot(work / "quantized") != first
    assert manifest(work)["artifacts"]["export"]["quant_dtype"] == "fp8"


def test_another_work_dirs_output_is_refused(tmp_path, capsys):
    main(["smooth_quant", "tiny:llama", "--work-dir", str(tmp_path / "a"), *CALIB, "--out-dir", str(tmp_path / "q")])

    message = lite_error(capsys, "smooth_quant", "tiny:llama", "--work-dir", tmp_path / "b", *CALIB,
                         "--out-dir", tmp_path / "q")

    assert "written for work dir" in message and str(tmp_path / "a") in message
    assert not (tmp_path / "b").exists()


def test_export_record_carries_the_settings_that_made_the_checkpoint(tmp_path):
    work = tmp_path / "work"
    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *CALIB, "--alpha", "0.5", "--max-shard-size", "50KB"])

    record = manifest(work)["artifacts"]["export"]
    marker = json.loads((work / "quantized" / MARKER).read_text())["export"]
    assert record["migration_scales"]["alpha"] == 0.5 and record["max_shard_size"] == "50KB"
    assert record["migration_scales"]["files"]["migration_scales.pth"] == sha256(work / "migration_scales.pth")
    assert {k: v for k, v in record.items() if k not in ("out_dir", "lite_version")} == marker


# ---------------------------------------------------------------------------- provenance

def test_edited_calibration_text_is_calibrated_again(tmp_path, capsys):
    """The defect: the cache keyed on the dataset path, so an edited file gave the old checkpoint."""
    text, work = tmp_path / "calib.txt", tmp_path / "work"
    story = open(os.path.join(os.path.dirname(__file__), "..", "lite", "data", "sample.txt")).read()
    text.write_text(story)
    args = ["--calib-dataset", str(text), "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]
    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *args])
    old = (work / "inputs_stats.pth").read_bytes()
    text.write_text(story[::-1])  # same path, same length, other text
    capsys.readouterr()

    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *args])

    assert "calib_data_sha256" in capsys.readouterr().out
    assert (work / "inputs_stats.pth").read_bytes() != old
    record = manifest(work)["artifacts"]["statistics"]
    assert record["calib_data_sha256"] == sha256(text)
    assert record["files"]["inputs_stats.pth"] == sha256(work / "inputs_stats.pth")


def test_smooth_reuses_the_statistics_calibrate_made_with_custom_data(tmp_path, capsys, monkeypatch):
    """The defect: `lite smooth` ignored what `lite calibrate` recorded and recalibrated on wikitext2."""
    work = tmp_path / "work"
    main(["calibrate", "tiny:llama", "--work-dir", str(work), *CALIB])
    stats = snapshot(work)
    from lite import pipeline

    monkeypatch.setattr(pipeline, "run_calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    capsys.readouterr()

    main(["smooth", "tiny:llama", "--work-dir", str(work), "--device", "cpu"])

    out = capsys.readouterr().out
    assert "--calib-dataset, --calib-samples, --calib-seqlen, --seed as recorded" in out
    assert "4 x 64 tokens of sample, seed 0" in out
    assert "reusing" in out and "inputs_stats.pth" in out
    assert all(snapshot(work)[name] == stats[name] for name in ("inputs_stats.pth", "outputs_stats.pth"))
    assert manifest(work)["artifacts"]["migration_scales"]["calib_dataset"] == "sample"


def test_statistics_bytes_are_the_same_in_every_process(tmp_path):
    """The defect: set iteration order (which differs between processes) changed the file's bytes."""
    digests = set()
    for seed in ("1", "2", "3"):
        work = tmp_path / f"w{seed}"
        subprocess.run([sys.executable, "-m", "lite.cli.main", "calibrate", "tiny:llama", "--work-dir", str(work),
                        *CALIB], check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
        digests.add(sha256(work / "inputs_stats.pth"))
    assert len(digests) == 1


# ---------------------------------------------------------------------------- flags

@pytest.mark.parametrize("value, smoothed", [("false", True), ("FALSE", True), ("no", True), ("0", True),
                                             ("true", False), ("Yes", False), ("1", False)])
def test_boolean_flags_mean_what_was_typed(tmp_path, value, smoothed):
    """The defect: --no-smooth=false skipped smoothing (fire took any string as true)."""
    work = tmp_path / "work"

    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *CALIB, f"--no-smooth={value}"])

    assert manifest(work)["artifacts"]["export"]["smoothed"] is smoothed
    assert (work / "migration_scales.pth").exists() is smoothed


def test_export_migration_scale_false_stores_no_scales(tmp_path):
    work = tmp_path / "work"
    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *CALIB, "--export-migration-scale=false"])
    config = json.loads((work / "quantized" / "config.json").read_text())
    assert "migration_scale" not in config["quantization_config"]


@pytest.mark.parametrize("args, expected", [
    (["--frobnicate", "3"], "unknown flag --frobnicate"),
    (["--calib-sample", "8"], "did you mean --calib-samples?"),
    (["--no-smooth=maybe"], "true/false/yes/no/1/0"),
    (["--calib-samples", "many"], "--calib-samples expects an integer, got 'many'"),
    (["--calib-seqlen"], "--calib-seqlen needs a value"),
    (["-q", "fp8"], "flags are spelled out"),
    (["extra-positional"], "'extra-positional' was given too"),
    (["--max-shard-size", "0"], "--max-shard-size must be positive"),
    (["--max-shard-size", "-5"], "--max-shard-size must be positive"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, args, expected):
    work = tmp_path / "work"

    message = lite_error(capsys, "smooth_quant", "tiny:llama", "--work-dir", work, *CALIB, *args)

    assert expected in message
    assert not work.exists()


def test_unknown_flag_fails_at_once_from_the_shell(tmp_path):
    """Before the model is opened: no import of transformers' model code, nothing written."""
    work = tmp_path / "work"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lite.cli.main", "smooth_quant", "tiny:llama", "--work-dir",
                             str(work), "--frobnicate", "3"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "lite: error: unknown flag --frobnicate for `lite smooth_quant`; `lite smooth_quant --help` lists the flags"]
    assert not work.exists()
    assert seconds < 30, seconds  # generous for a loaded CI machine; it takes about 2 s here


def test_version_and_usage(capsys):
    main(["--version"])
    assert capsys.readouterr().out.strip().startswith("lite 0.")
    main([])
    assert "smooth_quant" in capsys.readouterr().out
    assert "did you mean smooth_quant?" in lite_error(capsys, "smoothquant", "tiny:llama")


# ---------------------------------------------------------------------------- lock and debris

def test_second_run_on_a_work_dir_in_use_is_refused(tmp_path, capsys):
    work = tmp_path / "work"
    with locked_work_dir(str(work)):
        message = lite_error(capsys, "calibrate", "tiny:llama", "--work-dir", work, *CALIB)
    assert message.startswith(f"work dir {work} is in use by pid {os.getpid()}")
    assert not (work / "inputs_stats.pth").exists()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_later_run_removes_what_dead_runs_left(tmp_path):
    work = tmp_path / "work"
    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *CALIB])
    pid = dead_pid()
    (work / f"quantized.tmp-{pid}").mkdir()
    (work / f"quantized.tmp-{pid}" / "model.safetensors").write_bytes(b"\0" * 1000)
    (work / f"inputs_stats.pth.tmp-{pid}").write_bytes(b"partial")
    (work / f"quantized.tmp-{os.getpid()}").mkdir()  # a live process's: kept
    (tmp_path / f"q.tmp-{pid}").mkdir()  # beside an --out-dir: removed with that out-dir's run
    (tmp_path / f"notes.tmp-{pid}").mkdir()  # not lite's (another name) outside the work dir: kept

    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *CALIB, "--out-dir", str(tmp_path / "q")])

    assert sorted(p.name for p in tmp_path.rglob("*.tmp-*")) == [f"notes.tmp-{pid}", f"quantized.tmp-{os.getpid()}"]


def test_an_old_output_moved_aside_is_restored(tmp_path):
    """Killed between moving the old output aside and renaming the new one in: the old one comes back."""
    work = tmp_path / "work"
    main(["smooth_quant", "tiny:llama", "--work-dir", str(work), *CALIB])
    before = snapshot(work / "quantized")
    (work / "quantized").rename(work / f"quantized.old-{dead_pid()}")

    main(["calibrate", "tiny:llama", "--work-dir", str(work), *CALIB])

    assert snapshot(work / "quantized") == before
