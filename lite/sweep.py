"""The one loop over the decoder blocks (DESIGN.md, "The one idea").

    sweep(source, steps, tokens, sink):
      for step in steps: step.start(run)
      inputs = capture(source, tokens)             # block-0 inputs, from the model's own forward
      for each block i (block i+1 read ahead on a GPU):
          for step in steps: step.prepare_(block)  # exact changes before it is observed
          hooks = every step's observers(block)    # none: no forward
          forward over the cached inputs with the hooks; remove them (also on an error)
          for step in steps: step.apply_(block)    # recipe order is phase order; quantization
                                                   # records become the writer's modules at once
          inputs = the forward's outputs           # float, or (a step's `propagates_quantized`) a
                                                   # second forward's of the quantized block
          sink.write(block's tensors); source.release(block)
      for step in steps: step.end(run)
      sink.close()

It knows no algorithm (steps) and no format (the sink). Memory: one block's weights (two while the
next is read), the cached hidden states (on the device while they fit `max_gpu_memory`, else in
pinned CPU memory, moved one batch at a time) and one batch of activations.
"""

import ctypes
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lite.calibrate import capture_block_inputs, removing, show_tokens_per_second
from lite.export import parse_size
from lite.model import check_finite_tensor
from lite.moe import describe_routing, every_expert_sees_all_tokens
from lite.quant import CHUNK_ELEMENTS, row_chunks
from lite.smooth import check_finite
from lite.steps.base import Block, Hook

DEFAULT_MAX_GPU_MEMORY = "8GiB"


# ---------------------------------------------------------------------------- memory planning

def per_token_bytes(config, element_size: int, seqlen: int, copy_bytes: int = 8) -> int:
    """An upper estimate of the activation bytes one token needs inside a block's forward with observers:
    the MLP's gate, up, act and product (`intermediate` wide, model dtype), `copy_bytes` per value of
    the widest input for what the observers allocate from it (`Step.activation_copy_bytes`: an fp32
    copy and an abs of it, 8, unless the steps say less), and a few `hidden`-wide temporaries of
    attention and norms. A
    model whose attention runs eagerly (gpt_oss's sinks: no SDPA) also holds a score row per head and
    token: the scores, their fp32 softmax and the probabilities (measured: gpt-oss-20b's shape took
    36 GiB of an 8 GiB budget without this term)."""
    hidden, inter = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    total = (4 * element_size + copy_bytes) * inter + (8 * element_size + 16) * hidden
    if getattr(config, "_attn_implementation", None) == "eager":
        total += config.num_attention_heads * (seqlen + 1) * (2 * element_size + 4)
    return total


def plan_memory(budget: int, block_bytes: int, sample_bytes: int, samples: int, per_sample: int,
                batch_size) -> tuple[bool, int]:
    """(keep the cached hidden states on the device?, batch size) within `budget` bytes of device memory.

    Fixed: two blocks (the one running, the one read ahead) and the fp32 temporaries of smoothing and
    quantizing (a few chunks of `CHUNK_ELEMENTS`). Cached hidden states go to the device when they fit
    beside the fixed part and one sample's activations. `batch_size="auto"` takes as many samples per
    forward as the rest allows.
    """
    fixed = 2 * block_bytes + 4 * CHUNK_ELEMENTS * 4
    on_device = fixed + samples * sample_bytes + per_sample <= budget
    cached = samples * sample_bytes if on_device else 0
    per_batch_sample = per_sample + (0 if on_device else 2 * sample_bytes)
    if batch_size == "auto":
        batch_size = max(1, min(samples, (budget - 2 * block_bytes - cached) // per_batch_sample))
    return on_device, int(batch_size)


# ---------------------------------------------------------------------------- the runner

def _unmap_large_frees() -> None:
    """Make glibc return freed activation and weight buffers to the OS at once.

    glibc raises its mmap threshold after each large free, so later buffers of that size come from
    the heap, whose freed pages stay in RSS (measured: 0.76 GiB above the import baseline for a 1 GB
    model on the CPU, 0.23 GiB with the threshold fixed). `mallopt` with a fixed threshold (64 KiB)
    turns that off. glibc only; torch's pinned host memory is not affected.
    """
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: give back the top of the heap on every free


class _Later:
    """A call made when its result is asked for (a future that does not run ahead)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class Timer:
    def __init__(self, start: float):
        self.times, self.start = {}, start

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = round(self.times.get(stage, 0.0) + now - self.start, 3)
        self.start = now


@dataclass
class Run:
    """What `start` and `end` of a step see."""

    source: object
    tokens: torch.Tensor | None
    device: torch.device


def _attach(block: torch.nn.Module, hooks: list[Hook]) -> list:
    def feed(observer, where):
        def hook(module, args, out):
            observer.update(args[0] if where == "input" else out)
        return hook

    def feed_call(observer):
        def hook(module, args, kwargs, out):
            observer.update_call(args, kwargs, out)
        return hook

    return [block.get_submodule(h.module).register_forward_hook(feed_call(h.observer), with_kwargs=True)
            if h.where == "call" else block.get_submodule(h.module).register_forward_hook(feed(h.observer, h.where))
            for h in hooks]


@torch.no_grad()
def sweep(source, steps: list, tokens: torch.Tensor | None = None, sink=None, batch_size="auto", device="cpu",
          max_gpu_memory=DEFAULT_MAX_GPU_MEMORY, timer: "Timer | None" = None, progress: bool = True,
          all_experts: bool = True, second_chain: bool = False) -> dict:
    """Run `steps` over every block of `source`, each block's weights loaded once; returns a summary
    (batch size, where the hidden states were kept, peak GPU memory; for MoE models the tokens routing
    sent each expert of each block, `routed_tokens`).

    In a MoE block's observed forward every expert runs on every token when `all_experts` (its observers
    see them all), on its routed tokens only otherwise; the outputs follow the model's routing either way.

    `tokens` `(samples, seqlen)` run through each block that a step observes; `sink` (a checkpoint
    writer with `wants`, `write`, `close`) receives the embeddings, every finished block, the final
    norm and the lm_head.

    `second_chain`: the steps from the first one marked `second_chain` on observe a second forward of
    each block, after the steps before them have applied (SmoothQuant folded its factors), on a second
    activation cache that those changed blocks' outputs carry on: static scales of the smoothed model
    and the statistics of the float one in one read of the weights.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    timer = timer or Timer(time.perf_counter())
    model, arch, config = source.model, source.arch, source.config
    esize = torch.empty((), dtype=source.dtype).element_size()
    blocks = source.blocks()
    block_bytes = max(sum(p.numel() for p in b.parameters()) * esize for b in blocks.values())
    on_device, summary = True, {}
    if not cuda:
        _unmap_large_frees()
    if tokens is not None:
        budget = parse_size(max_gpu_memory) if cuda else 1 << 62
        samples, seqlen = tokens.shape
        copy_bytes = max((step.activation_copy_bytes for step in steps), default=0)
        per_sample = seqlen * per_token_bytes(config, esize, seqlen, copy_bytes)
        if cuda:
            chains = 2 if second_chain else 1
            on_device, batch_size = plan_memory(budget, block_bytes, chains * seqlen * config.hidden_size * esize,
                                                samples, per_sample, batch_size)
        else:  # on the CPU: activations no larger than a block's weights; the batch size hardly changes the speed
            batch_size = max(1, min(samples, block_bytes // per_sample)) if batch_size == "auto" else batch_size
        summary.update(batch_size=batch_size, hidden_on_device=on_device)
    run = Run(source, tokens, device)
    for step in steps:
        step.start(run)
    timer.lap("setup")

    read_pool, write_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    # On a GPU block i+1 is read while block i runs; on the CPU, where compute dwarfs reading, a read
    # ahead would only hold a second block in memory, so each read happens when its result is asked for.
    read_ahead = read_pool.submit if cuda else _Later
    copy_stream = torch.cuda.Stream(device) if cuda else None
    prefixes = list(blocks)
    # The final norm's and lm_head's tensors (weights, and biases where the family has them).
    tail_names = [] if sink is None else [n for module in (arch.final_norm, arch.lm_head)
                                          for n in (f"{module}.{p}" for p, _ in
                                                    model.get_submodule(module).named_parameters())
                                          if sink.wants(n)]

    def copy_tail() -> None:
        """The final norm and (untied) lm_head to the output, a chunk of rows at a time."""
        for name in tail_names:
            shape = source.shape(name)
            for rows in row_chunks(shape[0], shape[1] if len(shape) > 1 else 1):
                part = source.read_rows(name, rows.start, rows.stop)
                check_finite_tensor(name, part, rows.start)
                sink.write(name, part, row_start=rows.start)

    def write(tensors: dict[str, torch.Tensor], ready) -> None:
        if ready is not None:
            ready.synchronize()
        for name, t in tensors.items():
            sink.write(name, t)

    def to_host(tensors: dict[str, torch.Tensor]):
        """CPU copies (pinned, asynchronous on a GPU) and the event that says they are complete."""
        if not cuda:
            return {n: t.detach().contiguous() for n, t in tensors.items()}, None
        host = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for n, t in tensors.items()}
        event = torch.cuda.Event()
        event.record()
        return host, event

    # Float outputs go to the next block unless a step asks for the quantized ones (GPTQ: later blocks
    # then compensate for the errors of earlier ones); that costs a second forward per block.
    propagate_quantized = any(getattr(step, "propagates_quantized", False) for step in steps)
    split = next((k for k, step in enumerate(steps) if getattr(step, "second_chain", False)), len(steps)) \
        if second_chain else len(steps)
    first_steps, later_steps = steps[:split], steps[split:]

    def realize(block: Block) -> None:
        """A step's quantization records become the writer's modules at once: the steps after it and the
        forward of quantized outputs compute with what the checkpoint will hold."""
        if block.records:
            assert sink is not None, "a step quantized a block, but the sweep was given no writer"
            sink.realize_(block)
            block.records = {}

    def forward(module: torch.nn.Module, index: int, keep: bool, hidden: list) -> None:
        """Run the cached inputs `hidden` through `module`, block number `index` (whose own mask and position
        arguments it gets); with `keep`, its outputs replace them."""
        for j, (h, kw) in enumerate(zip(hidden, kwargs)):
            out = module(h.to(device, non_blocking=True), **kw[index])
            out = out[0] if isinstance(out, tuple) else out
            if not keep:
                continue
            if on_device or not cuda:
                hidden[j] = out
            else:
                h.copy_(out)

    written = None
    pending = read_ahead(source.fetch, prefixes[0], device, copy_stream)
    hidden, kwargs, pinned, hidden2, pinned2 = [], [], None, [], None
    bar = tqdm(prefixes, desc="blocks", unit="block", dynamic_ncols=True, disable=not progress)
    try:
        embed_name = source.embed_name
        if (tokens is not None and source.reads_embeddings) or sink is not None:
            # The embeddings (1 GB and more) pass through CPU memory a chunk of rows at a time: to the
            # output, and to the device for the model's own forward up to the first block.
            embed_shape = source.shape(embed_name)
            embed = torch.empty(embed_shape, dtype=source.dtype, device=device) \
                if tokens is not None and source.reads_embeddings else None
            for rows in row_chunks(*embed_shape):
                part = source.read_rows(embed_name, rows.start, rows.stop)  # (rows, hidden)
                if sink is not None:
                    if embed is None:  # else checked once on the device below
                        check_finite_tensor(embed_name, part, rows.start)
                    sink.write(embed_name, part, row_start=rows.start)
                if embed is not None:
                    embed[rows] = part.to(device)
            del part
            if embed is not None:
                check_finite_tensor(embed_name, embed)
                source.set_embeddings(embed)
                del embed
        if tokens is not None:
            # Block 0's inputs: the model's own forward up to the first block (embeddings, rotary tables, masks).
            source.outside_to(device)
            try:
                # Hidden states that do not fit the device budget wait in one pinned CPU buffer.
                pinned = None if on_device or not cuda else torch.empty((samples, seqlen, config.hidden_size),
                                                                        dtype=source.dtype, pin_memory=True)
                for first in range(0, samples, batch_size):
                    chunk = tokens[first:first + batch_size]  # (batch, seqlen)
                    h, kw = capture_block_inputs(model, arch, chunk, len(chunk), device)
                    hidden.append(h[0] if pinned is None else pinned[first:first + len(chunk)].copy_(h[0]))
                    kwargs.append(kw[0])
                if later_steps:  # the second chain starts from the same inputs
                    pinned2 = None if pinned is None else torch.empty_like(pinned, pin_memory=True).copy_(pinned)
                    hidden2 = [h.clone() for h in hidden] if pinned2 is None else \
                        [pinned2[first:first + len(h)] for first, h in zip(range(0, samples, batch_size), hidden)]
            finally:
                source.outside_done()
            timer.lap("capture")

        for i, prefix in enumerate(bar):
            weights = pending.result()
            if i + 1 < len(prefixes):
                pending = read_ahead(source.fetch, prefixes[i + 1], device, copy_stream)
            elif sink is not None:  # the final norm and lm_head, copied while the last block runs
                pending = read_ahead(copy_tail)
            else:
                pending = None
            timer.lap("wait_read")
            module = blocks[prefix]
            source.attach(prefix, module, weights, device)
            del weights
            for name, p in module.named_parameters():  # before the forward: a NaN is named where it is
                check_finite(f"{prefix}.{name}", p, "weight")
            block = Block(i, prefix, module, arch.of_block(i), config)
            for step in steps:
                step.prepare_(block)
            hooks = [hook for step in first_steps for hook in step.observers(block)]
            if hooks:
                assert tokens is not None, "a step observes activations, but the sweep was given no tokens"
                with removing(_attach(module, hooks)), every_expert_sees_all_tokens(module, block.arch, all_experts) as moe:
                    forward(module, i, not propagate_quantized, hidden)
                if moe is not None:
                    routed = summary.setdefault("routed_tokens", {})[prefix] = moe.routed_tokens.cpu().tolist()
                    if progress:
                        bar.write(describe_routing(prefix, torch.tensor(routed)))
                timer.lap("forward")
            for step in first_steps:
                step.apply_(block)
                realize(block)
            hooks2 = [hook for step in later_steps for hook in step.observers(block)]
            if hooks2:  # the block as the steps before have left it, on the second chain
                with removing(_attach(module, hooks2)), every_expert_sees_all_tokens(module, block.arch, all_experts):
                    forward(module, i, True, hidden2)
                timer.lap("forward_second")
            for step in later_steps:
                step.apply_(block)
                realize(block)
            timer.lap("smooth_quantize")
            if hooks and propagate_quantized:
                forward(module, i, True, hidden)  # the next block sees this block's quantized outputs
                timer.lap("forward_quantized")
            if sink is not None:
                outputs, ready = to_host(module.state_dict(prefix=prefix + "."))
                if written is not None:
                    written.result()  # at most one block waits for the disk
                written = write_pool.submit(write, outputs, ready)
                del outputs
            source.release(prefix, module)
            timer.lap("write")
            show_tokens_per_second(bar, tokens if hooks else None, i + 1)
        del hidden, kwargs, pinned, hidden2, pinned2
        if pending is not None:
            pending.result()
        if written is not None:
            written.result()
        for step in steps:
            step.end(run)
        if sink is not None:
            sink.close()
    finally:
        bar.close()
        read_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)
    if cuda:
        summary["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return summary
