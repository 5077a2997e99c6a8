"""What every step and the sweep share: `Step` (the lifecycle, every method optional), `Block` (a
decoder block on its way through the sweep) and `Hook` (an observer fed by a module's input or output)."""

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class Hook:
    """Feed `observer.update` with the input (first positional argument) or the output of a module of the
    block, or `observer.update_call` with a whole call (to run the module again later on the same inputs)."""

    module: str  # dotted name relative to the block
    where: str  # "input", "output", or "call": `observer.update_call(args, kwargs, output)` of each call
    observer: object

    def __post_init__(self):
        assert self.where in ("input", "output", "call"), f"Hook.where must be input, output or call, got {self.where!r}"


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
    input_scales: dict = field(default_factory=dict)  # {linear fqn: static input scale}, set by `static_scales`
    # {linear name in the block: lite.records.QuantizedWeight}, set by the quantizing steps; the sweep
    # hands them to the writer, whose format turns them into its modules
    records: dict = field(default_factory=dict)


class Step:
    """Base class of every step: each lifecycle method does nothing unless a step overrides it.

    `activation_copy_bytes`: the bytes per value of an observed activation that the step's observers
    allocate while they update (an fp32 copy is 4, its abs 4 more), for the sweep's memory plan; a step
    that says nothing is planned for 8."""

    activation_copy_bytes = 8

    def start(self, run) -> None:
        pass

    def prepare_(self, block: Block) -> None:
        pass

    def observers(self, block: Block) -> list[Hook]:
        return []

    def apply_(self, block: Block) -> None:
        pass

    def end(self, run) -> None:
        pass

    def artifacts(self) -> dict:
        return {}
