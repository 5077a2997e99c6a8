"""Steps: one algorithm each, acting on one decoder block at a time inside `lite.sweep.sweep`.

A step has a small lifecycle, every method optional (DESIGN.md):

    start(run)                 before block 0 (check the architecture, set up tables)
    prepare_(block)            exact changes to the block before it is observed (fuse norms, rotate, fold
                               given scales)
    observers(block)           hooks to attach for the block's calibration forward: [Hook]; none, no forward
    apply_(block)              after that forward (hooks already removed): fold, search, quantize
    end(run)                   after the last block
    artifacts()                what the step leaves in the work dir: {filename: object}

The sweep calls them in recipe order, which is phase order: `[statistics, smoothquant, rtn]` takes
statistics, computes migration scales from them and quantizes, block by block. `STEPS` maps names to
step classes; `create(name, **settings)` makes one, `register(name, cls)` adds a user's own.

Two steps live here without a registry name: `alpha_search` (`--alpha auto`; it needs the float model's
statistics from an earlier sweep) and `readback` (the last step of every streamed export, added by
`lite.stream` itself).
"""

from lite.errors import LiteError
from lite.steps.base import Block, Hook, Step

__all__ = ["Block", "Hook", "Step", "STEPS", "create", "register"]


STEPS: dict[str, type] = {}


def register(name: str, cls: type) -> type:
    """Make `cls` (a Step subclass) available to `create` and recipes under `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        raise LiteError(f"cannot register {cls!r} as step {name!r}: a step must be a subclass of lite.steps.Step")
    STEPS[name] = cls
    return cls


def create(name: str, **settings) -> Step:
    """A step by its registered name, with its settings (checked by the step's own settings)."""
    if name not in STEPS:
        raise LiteError(f"unknown step {name!r}; registered steps: {', '.join(sorted(STEPS))}")
    return STEPS[name](**settings)


def _register_builtin() -> None:
    from lite.steps.awq import Awq
    from lite.steps.gptq import Gptq
    from lite.steps.rtn import Rtn
    from lite.steps.smoothquant import SmoothQuant
    from lite.steps.static_scales import StaticScales
    from lite.steps.stats import Statistics
    from lite.steps.transforms import CenterEmbeddings, FuseNorms, Rotate

    register("fuse_norms", FuseNorms)
    register("rotate", Rotate)
    register("center_embeddings", CenterEmbeddings)
    register("statistics", Statistics)
    register("static_scales", StaticScales)
    register("smoothquant", SmoothQuant)
    register("rtn", Rtn)
    register("gptq", Gptq)
    register("awq", Awq)


_register_builtin()
