"""Steps: one algorithm each, acting on one decoder block at a time inside `lite.sweep.sweep`.

A step has a small lifecycle, every method optional (DESIGN.md):

    start(run)                 before block 0 (check the architecture, set up tables)
    observers(block)           hooks to attach for the block's calibration forward: [Hook]; none, no forward
    apply_(block)              after that forward (hooks already removed): fold, search, quantize
    end(run)                   after the last block
    artifacts()                what the step leaves in the work dir: {filename: object}

The sweep calls them in recipe order, which is phase order: `[statistics, smoothquant, rtn]` takes
statistics, computes migration scales from them and quantizes, block by block. `STEPS` maps names to
step classes; `create(name, **settings)` makes one, `register(name, cls)` adds a user's own.
"""

from dataclasses import dataclass, field

import torch.nn as nn

from lite.errors import LiteError


@dataclass
class Hook:
    """Feed `observer.update` with the input (first positional argument) or the output of a module of the block."""

    module: str  # dotted name relative to the block
    where: str  # "input" or "output"
    observer: object

    def __post_init__(self):
        assert self.where in ("input", "output"), f"Hook.where must be input or output, got {self.where!r}"


@dataclass
class Block:
    """One decoder block on its way through the sweep, and what steps leave on it for later steps."""

    index: int
    prefix: str  # e.g. model.layers.3
    module: nn.Module
    arch: object
    config: object
    absmax: dict = field(default_factory=dict)  # {linear fqn: max|x| of its input}, set by `statistics`
    scales: dict = field(default_factory=dict)  # {consumer linear fqn: migration scale s}, set by `smoothquant`


class Step:
    """Base class of every step: each lifecycle method does nothing unless a step overrides it."""

    def start(self, run) -> None:
        pass

    def observers(self, block: Block) -> list[Hook]:
        return []

    def apply_(self, block: Block) -> None:
        pass

    def end(self, run) -> None:
        pass

    def artifacts(self) -> dict:
        return {}


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
    from lite.steps.rtn import Rtn
    from lite.steps.smoothquant import SmoothQuant
    from lite.steps.stats import Statistics

    register("statistics", Statistics)
    register("smoothquant", SmoothQuant)
    register("rtn", Rtn)


_register_builtin()
