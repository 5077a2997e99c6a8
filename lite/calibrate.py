"""Pieces of the block loop (`lite/sweep.py`): per-channel running statistics, the capture of block 0's
inputs (each block's forward replaced by a recorder; the model's own forward stopped early), and hook
removal.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from lite.archs import Arch
from lite.smooth import check_finite

STATS = ("max", "min", "mean", "absmax", "absmean")


class RunningStats:
    """Per-channel max, min, mean, absmax and absmean over every token seen, kept on x's device."""

    def __init__(self):
        self.count = 0
        self.max = self.min = self.sum = self.absmax = self.abssum = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        # Three reads of x in its own dtype, no fp32 copy: min and max are exact in any dtype,
        # max|x| = max(max x, -min x), and the sums accumulate in fp32.
        x = x.detach().reshape(-1, x.shape[-1])  # (tokens, channels)
        low, high = torch.aminmax(x, dim=0)
        low, high = low.float(), high.float()
        total = x.sum(0, dtype=torch.float32)
        abstotal = torch.linalg.vector_norm(x, ord=1, dim=0, dtype=torch.float32)
        if self.count == 0:
            self.max, self.min, self.sum, self.abssum = high, low, total, abstotal
            self.absmax = torch.maximum(high, -low)
        else:
            torch.maximum(self.max, high, out=self.max)
            torch.minimum(self.min, low, out=self.min)
            torch.maximum(self.absmax, torch.maximum(high, -low), out=self.absmax)
            self.sum += total
            self.abssum += abstotal
        self.count += x.shape[0]

    def merge(self, other: "RunningStats") -> None:
        """Fold in the statistics of other tokens: the same as one RunningStats over both."""
        if other.count == 0:
            return
        if self.count == 0:
            self.max, self.min, self.sum, self.abssum, self.absmax = (
                t.clone() for t in (other.max, other.min, other.sum, other.abssum, other.absmax))
        else:
            torch.maximum(self.max, other.max, out=self.max)
            torch.minimum(self.min, other.min, out=self.min)
            torch.maximum(self.absmax, other.absmax, out=self.absmax)
            self.sum += other.sum
            self.abssum += other.abssum
        self.count += other.count

    def result(self) -> dict[str, torch.Tensor]:
        """fp32 CPU tensors; means are weighted by token count."""
        out = {"max": self.max, "min": self.min, "mean": self.sum / self.count,
               "absmax": self.absmax, "absmean": self.abssum / self.count}
        return {k: v.cpu() for k, v in out.items()}


class _StopForward(Exception):
    """Raised by the last block's recorder once every block's arguments are recorded."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: Arch, tokens: torch.Tensor, batch_size: int, device):
    """(hidden, kwargs): the hidden states block 0 receives, one entry per batch, and the keyword
    arguments every block receives, `kwargs[batch][block]`: blocks of different attention types get
    different masks (full or sliding-window, as `config.layer_types` says), which the model's own
    forward builds.

    For the capture each block's `forward` is replaced by a recorder that keeps its arguments and
    hands the hidden states on unchanged, so no block computes (a streamed skeleton's blocks hold no
    weights); the last one stops the forward. Everything outside the blocks (embeddings, rotary tables)
    must already be on `device`.
    """
    layers = list(model.get_submodule(arch.blocks))
    hidden, kwargs = [], []

    def recorder(i: int):
        def forward(*args, **kw):
            kw = dict(kw)
            h = args[0] if args else kw.pop("hidden_states")
            kw.update(cache=None, use_cache=False)
            kw.pop("past_key_values", None)
            if i == 0:
                hidden.append(h)
                kwargs.append([])
            kwargs[-1].append(kw)
            if i == len(layers) - 1:
                raise _StopForward
            return h
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute: the class's forward is back once it is deleted
    try:
        for batch in tokens.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer in layers:
            del layer.forward
    assert all(len(kw) == len(layers) for kw in kwargs), \
        f"the model's forward called {[len(kw) for kw in kwargs]} of its {len(layers)} blocks"
    return hidden, kwargs


def show_tokens_per_second(bar, tokens: torch.Tensor | None, blocks_done: int) -> None:
    """Calibration tokens pushed through blocks per second, on a block progress bar."""
    elapsed = bar.format_dict.get("elapsed") or 0.0
    if tokens is not None and elapsed > 0:
        bar.set_postfix_str(f"{tokens.numel() * blocks_done / elapsed:.0f} tokens/s")


@contextmanager
def removing(handles):
    """Remove hook handles when the block is done, also when it raised."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def store_statistics(observed_in: dict, observed_out: dict, inputs: dict, outputs: dict) -> None:
    """Move observed statistics into `{stat: {fqn: tensor}}` tables, refusing NaN/Inf by name. Linears that
    share an observer (the readers of a norm: 256 of them in a 128-expert MoE block) share its tensors."""
    results = {}
    for observed, table in ((observed_in, inputs), (observed_out, outputs)):
        for fqn, stats in observed.items():
            if id(stats) not in results:
                results[id(stats)] = stats.result()
            for stat, value in results[id(stats)].items():
                check_finite(fqn, value, f"calibration statistic {stat!r}")
                table.setdefault(stat, {})[fqn] = value
