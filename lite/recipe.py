"""Step recipes for `lite run`: calibration data, an ordered list of steps from the registry, one format.

    description: W8A8 int8 with the residual stream rotated first
    data: {calib_dataset: sample, calib_samples: 64, calib_seqlen: 256, seed: 0}
    steps:
      - fuse_norms
      - rotate: {seed: 0}
      - smoothquant: {alpha: 0.3, w_stat: lmdeploy}
      - static_scales: {act_observer: mse}     # compressed-tensors only
      - rtn: {quant_dtype: int8}
    format: compressed-tensors

What this version runs: model-preparation transforms first (`fuse_norms`, `rotate`,
`center_embeddings`), then either W8A8 (optionally `smoothquant`, optionally `static_scales`, then
`rtn`, or `gptq` with `quant_dtype: int8` for GPTQ-rounded int8 weights) or weight-only (optionally
`awq`, then `rtn` with `bits` or `gptq`, with format compressed-tensors, awq or gptq).
The quantizing step ends the list. Every key is checked before any work; an unknown one is an error naming it and the
allowed ones. (Flag files for `--recipe` are a different thing: lite/recipes.py.)
"""

import os
from dataclasses import dataclass

from lite.errors import LiteError
from lite.formats import FORMATS
from lite.settings import CalibSettings

TOP_KEYS = ("description", "data", "steps", "format")
DATA_KEYS = ("calib_dataset", "calib_samples", "calib_seqlen", "seed", "moe_calibrate_all_experts")
TRANSFORMS = ("fuse_norms", "rotate", "center_embeddings")
STEP_SETTINGS = {"fuse_norms": (), "rotate": ("seed",), "center_embeddings": ("force",),
                 "smoothquant": ("alpha", "w_stat"), "static_scales": ("act_observer", "act_percentile"),
                 "rtn": ("quant_dtype", "export_migration_scale", "bits", "group_size", "symmetric", "mse",
                         "channel_fallback"),
                 "gptq": ("bits", "group_size", "symmetric", "damp", "act_order", "block_size", "mse", "quant_dtype",
                          "channel_fallback"),
                 "awq": ("bits", "group_size", "symmetric", "n_grid", "max_tokens", "clip", "channel_fallback")}
WEIGHT_ONLY_FORMATS = ("compressed-tensors", "awq", "gptq")


@dataclass(frozen=True)
class Recipe:
    path: str
    data: dict  # the data keys given (the rest from the command line or the defaults)
    steps: tuple  # ((name, {settings}), ...)
    format: str
    description: str = ""

    def settings_of(self, name: str) -> dict | None:
        return next((settings for step, settings in self.steps if step == name), None)

    @property
    def weight_only(self) -> bool:
        """The last step quantizes weights only (`gptq`, or `rtn` with `bits`)."""
        name, settings = self.steps[-1]
        return (name == "gptq" and settings.get("quant_dtype") is None) or (name == "rtn" and settings.get("bits") is not None)

    def record(self) -> dict:
        """What the manifest and the output's marker keep of the recipe."""
        return {"recipe": os.path.basename(self.path), "steps": [[n, s] for n, s in self.steps], "format": self.format}


def _fail(path: str, what: str) -> None:
    raise LiteError(f"recipe {path}: {what}")


def load(path: str) -> Recipe:
    """Read and check a step recipe (see the module doc)."""
    import yaml

    from lite.steps import STEPS

    if not os.path.isfile(path):
        raise LiteError(f"recipe {path} does not exist; pass a YAML file such as configs/recipes/w8a8-int8.yaml")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise LiteError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        _fail(path, "must be a mapping with keys " + ", ".join(TOP_KEYS))
    for key in raw:
        if key not in TOP_KEYS:
            _fail(path, f"unknown key {key!r}; allowed: {', '.join(TOP_KEYS)}")
    data = raw.get("data") or {}
    if not isinstance(data, dict) or any(k not in DATA_KEYS for k in data):
        bad = next((k for k in data if k not in DATA_KEYS), data) if isinstance(data, dict) else data
        _fail(path, f"unknown data key {bad!r}; allowed: {', '.join(DATA_KEYS)}")
    fmt = raw.get("format", "lmdeploy")
    if fmt not in {*FORMATS, *WEIGHT_ONLY_FORMATS}:
        _fail(path, f"format {fmt!r} is not one of: {', '.join(dict.fromkeys([*FORMATS, *WEIGHT_ONLY_FORMATS]))}")
    steps = []
    for entry in raw.get("steps") or []:
        if isinstance(entry, str):
            name, settings = entry, {}
        elif isinstance(entry, dict) and len(entry) == 1:
            ((name, settings),) = entry.items()
        else:
            _fail(path, f"each step is a name or {{name: {{settings}}}}, got {entry!r}")
        if name not in STEPS:
            _fail(path, f"unknown step {name!r}; registered steps: {', '.join(sorted(STEPS))}")
        if name not in STEP_SETTINGS:
            _fail(path, f"step {name!r} cannot be used in a recipe yet; recipe steps: {', '.join(STEP_SETTINGS)}")
        settings = settings or {}
        if not isinstance(settings, dict):
            _fail(path, f"the settings of step {name!r} must be a mapping, got {settings!r}")
        for key in settings:
            if key not in STEP_SETTINGS[name]:
                _fail(path, f"step {name!r} has no setting {key!r}; its settings: "
                            f"{', '.join(STEP_SETTINGS[name]) or 'none'}")
        _check_settings(path, name, settings)
        steps.append((name, dict(settings)))
    _check_order(path, steps, fmt)
    return Recipe(path, dict(data), tuple(steps), fmt, str(raw.get("description") or ""))


def _check_settings(path: str, name: str, settings: dict) -> None:
    """Values checked by the settings classes the stages use, before any work."""
    from lite.observers import ActSettings
    from lite.settings import SmoothSettings, check_quant_dtype

    try:
        if name == "smoothquant":
            if settings.get("alpha") == "auto":
                _fail(path, "alpha auto is not a recipe step yet; use `lite smooth --alpha auto`, or a number")
            SmoothSettings(**settings)
        elif name == "static_scales":
            ActSettings("static", **settings)
        elif name == "rtn" and settings.get("bits") is None:
            check_quant_dtype(settings.get("quant_dtype", "int8"))
        elif name in ("rtn", "gptq", "awq"):
            from lite.steps import create

            create(name, **settings)
        elif name == "rotate" and not isinstance(settings.get("seed", 0), int):
            _fail(path, f"rotate's seed must be an integer, got {settings['seed']!r}")
    except LiteError as e:
        raise LiteError(f"recipe {path}: step {name}: {e}".replace(f"recipe {path}: step {name}: recipe {path}: ",
                                                                     f"recipe {path}: ")) from None


def _check_order(path: str, steps: list, fmt: str) -> None:
    """transforms*, smoothquant?, static_scales?, rtn; or transforms*, (rtn with bits | gptq)."""
    names = [n for n, _ in steps]
    last = steps[-1][1] if steps else {}
    weight_only = bool(names) and ((names[-1] == "gptq" and last.get("quant_dtype") is None)
                                   or (names[-1] == "rtn" and last.get("bits") is not None))
    if weight_only:
        rest = [n for n in names[:-1] if n not in TRANSFORMS]
        if rest not in ([], ["awq"]) or (rest and names[-2] != "awq"):
            _fail(path, "a weight-only recipe is transforms, optionally awq, then its quantizing step (gptq, or rtn "
                        "with bits)")
        if rest:
            scheme = {k: steps[-2][1].get(k, d) for k, d in (("bits", 4), ("group_size", 128), ("symmetric", False))}
            final = {k: steps[-1][1].get(k, d) for k, d in (("bits", 4), ("group_size", 128), ("symmetric", True))}
            if scheme != final:
                _fail(path, f"awq searches for {scheme} but {names[-1]} quantizes to {final}; give both the same "
                            "bits, group_size and symmetric")
        if fmt not in WEIGHT_ONLY_FORMATS:
            _fail(path, f"weight-only steps write format compressed-tensors, awq or gptq, not {fmt!r}")
        if "rotate" in names and "fuse_norms" not in names[:names.index("rotate")]:
            _fail(path, "rotate needs fuse_norms before it")
        return
    if fmt not in FORMATS:
        _fail(path, f"format {fmt!r} stores weight-only checkpoints; end the steps with gptq or rtn with bits")
    if names[-1] == "gptq":  # W8A8 with GPTQ rounding
        if [n for n in names[:-1] if n not in TRANSFORMS] not in ([], ["smoothquant"]):
            _fail(path, "gptq with quant_dtype int8 follows the transforms and, optionally, smoothquant")
        return
    if not names or names[-1] != "rtn" or names.count("rtn") != 1:
        _fail(path, "the steps must end with rtn (the quantizing step), once")
    rest = [n for n in names[:-1] if n not in TRANSFORMS]
    first_other = next((i for i, n in enumerate(names) if n not in TRANSFORMS), len(names))
    if any(n in TRANSFORMS for n in names[first_other:]):
        _fail(path, f"transforms ({', '.join(TRANSFORMS)}) come before every other step")
    if rest not in ([], ["smoothquant"], ["static_scales"], ["smoothquant", "static_scales"]):
        _fail(path, "between the transforms and rtn: smoothquant, then static_scales, each optional")
    if "rotate" in names and "fuse_norms" not in names[:names.index("rotate")]:
        _fail(path, "rotate needs fuse_norms before it")
    if "static_scales" in names and fmt != "compressed-tensors":
        _fail(path, "static_scales needs format: compressed-tensors (lmdeploy's layout has per-token activations only)")


def calib_of(recipe: Recipe, given: dict) -> CalibSettings:
    """The recipe's data settings with the command line's (not None) on top, the defaults under both."""
    return CalibSettings(**{**recipe.data, **{k: v for k, v in given.items() if v is not None}})
