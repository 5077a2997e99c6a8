"""Recipes (configs/*.yaml): their flags apply, command-line flags win, bad keys are refused."""

import glob
import json
import os

import pytest

from lite.cli.main import COMMANDS, main
from lite.recipes import expand_recipe, load_recipe

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
CALIB = ["--calib-dataset", "sample", "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]


def write_recipe(path, text):
    path.write_text(text)
    return str(path)


def recorded_alpha(work):
    return json.loads((work / "lite_manifest.json").read_text())["artifacts"]["migration_scales"]["alpha"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))))
def test_shipped_recipes_name_only_flags_of_their_command(path):
    name = os.path.basename(path)
    command = {"w4a16-gptq.yaml": "auto_gptq", "w4a16-awq.yaml": "auto_awq"}.get(name, "smooth_quant")
    flags = load_recipe(path, COMMANDS[command])
    assert flags and ("quant_dtype" if command == "smooth_quant" else "w_bits") in flags


def test_recipe_values_apply(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "description: test\nalpha: 0.7\nw-stat: absmax\n")
    work = tmp_path / "work"

    main(["smooth", "tiny:llama", "--work-dir", str(work), "--recipe", recipe, *CALIB])

    assert recorded_alpha(work) == 0.7
    assert json.loads((work / "lite_manifest.json").read_text())["artifacts"]["migration_scales"]["w_stat"] == "absmax"


def test_command_line_flags_win_over_the_recipe(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "alpha: 0.7\n")
    work = tmp_path / "work"

    main(["smooth", "tiny:llama", "--work-dir", str(work), f"--recipe={recipe}", "--alpha", "0.2", *CALIB])

    assert recorded_alpha(work) == 0.2


def test_unknown_recipe_key_is_refused_before_any_work(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", "alpha: 0.7\nbits: 4\n")
    work = tmp_path / "work"

    with pytest.raises(SystemExit) as exit_info:
        main(["smooth_quant", "tiny:llama", "--work-dir", str(work), "--recipe", recipe, *CALIB])

    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "'bits'" in message and "alpha" in message and "\n" not in message
    assert not work.exists()


def test_without_recipe_argv_is_unchanged():
    argv = ["export", "tiny:llama", "--work-dir", "w", "--quant-dtype", "fp8"]
    assert expand_recipe(argv, COMMANDS) == argv
