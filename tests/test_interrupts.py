"""Interrupts, from the shell: SIGINT and SIGTERM end a run with one line and their exit codes and
leave nothing behind; SIGKILL at any point, then a re-run, gives exactly what an uninterrupted run
gives. The model is random but large enough (8 blocks, hidden 256) that a run takes several seconds."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import leftovers
from lite.model import build_tiny, byte_tokenizer


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "llama"
    model = build_tiny("llama", hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=32, tie_word_embeddings=False)
    model.save_pretrained(folder, max_shard_size="2MB")
    byte_tokenizer().save_pretrained(folder)
    return folder


def command(model_folder, work) -> list[str]:
    return [sys.executable, "-m", "lite.cli.main", "smooth_quant", str(model_folder), "--work-dir", str(work),
            "--calib-dataset", "random", "--calib-samples", "16", "--calib-seqlen", "256", "--device", "cpu",
            "--max-shard-size", "1MB"]


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_line(stderr: str) -> str:
    """The last line a terminal shows (progress bars redraw with carriage returns)."""
    return stderr.rstrip("\n").split("\n")[-1].split("\r")[-1]


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_ends_the_run_with_one_line_and_no_debris(tmp_path, model_folder, sig, code, name):
    work = tmp_path / "work"
    process = subprocess.Popen(command(model_folder, work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staged = work / f"quantized.tmp-{process.pid}"
    deadline = time.monotonic() + 120
    while not staged.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert staged.exists(), "the run never started writing"
    time.sleep(0.2)  # inside the pass over the blocks
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == code, stderr
    assert last_line(stderr) == f"lite: interrupted ({name}); nothing was written"
    assert "Traceback" not in stderr
    assert not work.exists() and leftovers(tmp_path) == []


def test_sigkill_anywhere_then_a_rerun_gives_the_uninterrupted_output(tmp_path, model_folder):
    """Kill at 10 points spread over a run; after each: no checkpoint folder unless it is the finished
    one, and a re-run in the same work dir gives the uninterrupted run's files byte for byte, with no
    temporary debris left."""
    work = tmp_path / "work"
    start = time.monotonic()
    subprocess.run(command(model_folder, work), check=True, capture_output=True)
    duration = time.monotonic() - start
    reference = snapshot(work)
    checkpoint = {k.removeprefix("quantized/"): v for k, v in reference.items() if k.startswith("quantized/")}
    assert "config.json" in checkpoint and len(checkpoint) > 10
    points = 10
    for k in range(points):
        shutil.rmtree(work)
        process = subprocess.Popen(command(model_folder, work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=duration * (k + 0.5) / points)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if (work / "quantized").exists():
            assert snapshot(work / "quantized") == checkpoint, f"kill point {k}: a partial checkpoint folder"

        subprocess.run(command(model_folder, work), check=True, capture_output=True)

        assert snapshot(work) == reference, f"kill point {k}"
        assert leftovers(tmp_path) == [], f"kill point {k}"
