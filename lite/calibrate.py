"""The layer-wise runner and per-channel activation statistics.

Calibration tokens go through the model one decoder block at a time: the inputs of block 0 are
captured with a forward pre-hook that stops the forward early, then each block in turn is moved to
the device, run over every cached batch with observers on its linears and norms, and moved back.
Only one block's weights and the cached hidden states are on the device at any time.
"""

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lite.archs import Arch, quantized_linears
from lite.model import decoder_blocks, move_outside_blocks_
from lite.smooth import check_finite

STATS = ("max", "min", "mean", "absmax", "absmean")


class RunningStats:
    """Per-channel max, min, mean, absmax and absmean over every token seen, kept on x's device."""

    def __init__(self):
        self.count = 0
        self.max = self.min = self.sum = self.absmax = self.abssum = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, channels)
        a = x.abs()
        if self.count == 0:
            self.max, self.min = x.amax(0), x.amin(0)
            self.sum, self.absmax, self.abssum = x.sum(0), a.amax(0), a.sum(0)
        else:
            torch.maximum(self.max, x.amax(0), out=self.max)
            torch.minimum(self.min, x.amin(0), out=self.min)
            torch.maximum(self.absmax, a.amax(0), out=self.absmax)
            self.sum += x.sum(0)
            self.abssum += a.sum(0)
        self.count += x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        """fp32 CPU tensors; means are weighted by token count."""
        out = {"max": self.max, "min": self.min, "mean": self.sum / self.count,
               "absmax": self.absmax, "absmean": self.abssum / self.count}
        return {k: v.cpu() for k, v in out.items()}


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: Arch, tokens: torch.Tensor, batch_size: int, device):
    """Hidden states and keyword arguments that block 0 receives, one entry per batch.

    Everything outside the blocks (embeddings, rotary tables) must already be on `device`.
    """
    first = model.get_submodule(arch.blocks)[0]
    hidden, kwargs = [], []

    def hook(module, args, kw):
        kw = dict(kw)
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kw.update(cache=None, use_cache=False)
        kw.pop("past_key_values", None)
        kwargs.append(kw)
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in tokens.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The block's output for every cached batch."""
    outs = []
    for h, kw in zip(hidden, kwargs):
        out = block(h, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def collect_statistics(model: nn.Module, arch: Arch, tokens: torch.Tensor, batch_size: int, device,
                       progress: bool = True):
    """(inputs_stats, outputs_stats) in lmdeploy's layout: `{stat: {fqn: fp32 tensor[channels]}}`.

    Inputs are recorded for every quantized linear of every block; outputs for those linears and for
    the norms that feed them.
    """
    inputs = {k: {} for k in STATS}
    outputs = {k: {} for k in STATS}
    move_outside_blocks_(model, arch, device)
    try:
        hidden, kwargs = capture_block_inputs(model, arch, tokens, batch_size, device)
        blocks = decoder_blocks(model, arch)
        for prefix, block in tqdm(blocks.items(), desc="calibrate", unit="block", disable=not progress):
            block.to(device)
            observed_in, observed_out, handles = {}, {}, []

            def observe(fqn, record_input):
                def hook(module, args, out):
                    if record_input:
                        observed_in.setdefault(fqn, RunningStats()).update(args[0])
                    observed_out.setdefault(fqn, RunningStats()).update(out)
                return hook

            for name in quantized_linears(arch, block):
                handles.append(block.get_submodule(name).register_forward_hook(observe(f"{prefix}.{name}", True)))
            for pair in arch.norm_pairs:
                handles.append(block.get_submodule(pair.norm).register_forward_hook(observe(f"{prefix}.{pair.norm}", False)))
            try:
                hidden = run_block(block, hidden, kwargs)
            finally:
                for handle in handles:
                    handle.remove()
                block.to("cpu")
            for observed, table in ((observed_in, inputs), (observed_out, outputs)):
                for fqn, stats in observed.items():
                    for stat, value in stats.result().items():
                        check_finite(fqn, value, f"calibration statistic {stat!r}")
                        table[stat][fqn] = value
    finally:
        move_outside_blocks_(model, arch, "cpu")
    return inputs, outputs
