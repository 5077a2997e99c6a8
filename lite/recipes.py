"""Recipes: named settings for a whole job, kept in YAML files (see `configs/`).

A recipe maps flag names (kebab or snake case) to values, plus an optional `description`. On the
command line, `--recipe FILE` is replaced by the recipe's flags, placed before the user's own flags so
that those win (the last value of a repeated flag counts: cli/flags.py).
"""

import inspect
import os

from lite.errors import LiteError

DESCRIPTION = "description"


def load_recipe(path: str, command) -> dict:
    """The flags of a recipe file, checked against the parameters of `command`."""
    import yaml

    if not os.path.isfile(path):
        raise LiteError(f"recipe {path} does not exist; pass a YAML file such as configs/w8a8-int8.yaml")
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise LiteError(f"recipe {path} is not valid YAML ({e})") from e
    if not isinstance(recipe, dict):
        raise LiteError(f"recipe {path} must be a mapping of flag names to values, got {type(recipe).__name__}")
    accepted = [p for p in inspect.signature(command).parameters if p not in ("model", "models", "recipe")]
    flags = {}
    for key, value in recipe.items():
        if key == DESCRIPTION:
            continue
        name = str(key).replace("-", "_")
        if name not in accepted:
            raise LiteError(f"recipe {path}: {key!r} is not a flag of `lite {command.__name__}`; "
                            f"flags: {', '.join(a.replace('_', '-') for a in accepted)}")
        flags[name] = value
    return flags


def expand_recipe(argv: list[str], commands: dict) -> list[str]:
    """argv with `--recipe FILE` (or `--recipe=FILE`) replaced by the recipe's flags, right after the command."""
    if not argv or argv[0] not in commands:
        return argv
    rest, path = [], None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--recipe" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--recipe="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if path is None:
        return argv
    flags = load_recipe(path, commands[argv[0]])
    expanded = [f"--{name}={value}" for name, value in flags.items()]
    return [argv[0], *expanded, *rest]
