"""`ReadbackRecord`, the last step of every streamed export, and the read-back check it feeds: the written
folder, read by its format's reader one block at a time (never the whole model), must compute what the
in-memory quantized blocks computed, before the folder is published (`lite.stream`)."""

import torch

from lite.errors import LiteError
from lite.formats import READBACK_TOLERANCE, block_reader
from lite.steps.base import Block, Hook, Step

class _FirstCall:
    """The arguments of a module's first call in the sweep's forward (an observer of whole calls)."""

    def __init__(self):
        self.args = self.kwargs = None

    def update_call(self, args, kwargs, out) -> None:
        if self.args is None:
            self.args, self.kwargs = args, kwargs


def _first_sample(x, batch: int):
    """`x` (a tensor, or a tuple or list of them) cut to its first sample where its leading dimension is
    the batch (tensors of two or more dimensions: masks, position ids; not `cache_position`)."""
    if isinstance(x, torch.Tensor):
        return x[:1] if x.dim() >= 2 and x.shape[0] == batch else x
    if isinstance(x, (tuple, list)):
        return type(x)(_first_sample(v, batch) for v in x)
    return x


class ReadbackRecord(Step):
    """The last step of a streamed export: each block, as the steps before it left it (quantized), runs
    on the previous block's quantized output for the first sample of the sweep's first batch, with that
    block's own masks and positions. `hidden` after the last block is what the written folder must
    compute (`check_streamed_readback`). One sample: the quantized blocks' fp32 work on a whole batch
    took 1.5 GiB of GPU memory on Llama-3-8B's shape."""

    activation_copy_bytes = 0  # keeps the first call's arguments (views); its own forward is one sample

    def __init__(self):
        self.hidden, self._call = None, None

    def observers(self, block: Block) -> list[Hook]:
        self._call = _FirstCall()
        return [Hook("", "call", self._call)]

    @torch.no_grad()
    def apply_(self, block: Block) -> None:
        args, kwargs = self._call.args, dict(self._call.kwargs)
        first = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: _first_sample(v, first.shape[0]) for k, v in kwargs.items()}
        out = block.module(first[:1] if self.hidden is None else self.hidden, **kwargs)
        self.hidden = out[0] if isinstance(out, tuple) else out
        self._call = None


class _LastOutput:
    """The output of the block it hooks (the last one seen)."""

    def __init__(self):
        self.out = None

    def update(self, out) -> None:
        self.out = out[0] if isinstance(out, tuple) else out


class _KeepLastOutput(Step):
    """Hooks every block (the sweep runs only observed blocks), keeping the output of the last."""

    activation_copy_bytes = 0

    def __init__(self):
        self.seen = _LastOutput()

    def observers(self, block: Block) -> list[Hook]:
        return [Hook("", "output", self.seen)]


def _reader_source(folder: str, sm):
    """The folder as its format's reader builds it, a meta skeleton whose blocks are read from the
    folder's shards (`Shards`), the tables outside the blocks taken from the source skeleton `sm`."""
    from lite.shards import ShardReader
    from lite.source import StreamedModel, _set_tensor

    structure, stored_names = block_reader(folder)
    model, _, _ = structure(folder, "meta")
    rename, transform = stored_names(model, sm.arch)
    inside = sm.arch.blocks + "."
    for name, b in sm.model.named_buffers():  # rotary tables, Gemma's embedding scale: from the config
        if not name.startswith(inside):
            _set_tensor(model, name, b, parameter=False)
    return StreamedModel(model, sm.tokenizer, folder, folder, ShardReader(folder), sm.dtype, rename=rename,
                         transform=transform)


@torch.no_grad()
def check_streamed_readback(folder: str, sm, tokens: torch.Tensor, expected: torch.Tensor, device,
                            max_gpu_memory) -> float:
    """The read-back check of a streamed export, block by block: the folder, read by its format's reader
    one block at a time (never the whole model), runs `tokens` (the export's first sample) through every
    block; its last block's output must equal `expected` (`ReadbackRecord.hidden`, the in-memory quantized
    blocks' output) within `READBACK_TOLERANCE` of its largest value. Raises before the folder is
    published otherwise."""
    from lite.source import Shards
    from lite.sweep import sweep

    back = _reader_source(folder, sm)
    keep = _KeepLastOutput()
    sweep(Shards(back), [keep], tokens, batch_size=len(tokens), device=device, max_gpu_memory=max_gpu_memory,
          progress=False, all_experts=False)  # experts on their routed tokens: the output is the same
    got, expected = keep.seen.out.float(), expected.to(keep.seen.out.device).float()
    diff, peak = (got - expected).abs().max().item(), expected.abs().max().item()
    print(f"read-back check (block by block): max |difference| of the last block's output {diff:.3g} "
          f"(max |value| {peak:.3g}) over {tokens.shape[0]} x {tokens.shape[1]} tokens")
    if not diff <= READBACK_TOLERANCE * max(peak, 1.0):
        raise LiteError(f"{folder} read back gives last-block outputs {diff:.3g} away from the in-memory quantized "
                        f"model (tolerance {READBACK_TOLERANCE * max(peak, 1.0):.3g}); nothing was published; "
                        "this is a bug in lite, please report it")
    return diff
