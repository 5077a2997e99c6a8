"""`static_scales`: one calibrated per-tensor input scale per quantized linear (compressed-tensors'
static activation scheme), `input_scale = r / qmax` with r from an observer (`lite/observers.py`:
minmax, percentile or mse). Linears that read the same tensor share one observer and one scale.

Run it on the smoothed float model (scales already folded), so that the scales describe the inputs
the quantized linears will see."""

import torch

from lite.observers import ActSettings, group_input, input_groups
from lite.quant import symmetric_scale
from lite.smooth import check_finite
from lite.steps.base import Block, Hook, Step


class StaticScales(Step):
    """`{linear fqn: fp32 input_scale (1,)}` in `self.scales`. In a sweep with `second_chain`, it observes
    the block after the steps before it (statistics, SmoothQuant with `fold`) have applied."""

    second_chain = True

    def __init__(self, act: ActSettings, qdtype: torch.dtype):
        self.act, self.qdtype = act, qdtype
        # minmax: one aminmax of each input, no copy; percentile and mse sample |x| with random keys
        self.activation_copy_bytes = 0 if act.act_observer == "minmax" else 8
        self.scales, self._observed = {}, []

    def observers(self, block: Block) -> list[Hook]:
        self._observed = [(group, self.act.observer(self.qdtype)) for group in input_groups(block.arch, block.module)]
        return [Hook(*group_input(block.arch, group), observer) for group, observer in self._observed]

    def apply_(self, block: Block) -> None:
        for group, observer in self._observed:
            r = observer.result().float().cpu()
            check_finite(f"{block.prefix}.{group[0]}", r, "input range")
            scale = symmetric_scale(r, self.qdtype).reshape(1)  # (1,)
            block.input_scales.update({f"{block.prefix}.{name}": scale for name in group})
        self.scales.update(block.input_scales)
        self._observed = []


@torch.no_grad()
def static_input_scales(model, arch, tokens: torch.Tensor, batch_size: int, device, act: ActSettings,
                        qdtype: torch.dtype, progress: bool = True) -> dict[str, torch.Tensor]:
    """The static scales of a model in memory, observed on it as it is, through the sweep."""
    from lite.source import Loaded
    from lite.sweep import sweep

    step = StaticScales(act, qdtype)
    sweep(Loaded(model, arch), [step], tokens, batch_size=batch_size, device=device, progress=progress)
    return step.scales
