"""`smooth_quant` in one pass over the blocks, streamed from the safetensors shards (DESIGN.md, "The spine").

The model is a skeleton on the meta device: no weight is allocated until its block's turn. For
block i, its tensors are read from the shards (block i+1's are read meanwhile on a background
thread), the cached float hidden states run through it with observers on its linears and norms
(statistics), its outputs become block i+1's inputs, its migration scales are computed from its
own weights and those statistics, folded in, the block is quantized, and its tensors go to a
sharded writer that puts each at its final offset in the output files. Then the block is freed.

The result is the same as calibrate → smooth → export on the fully loaded model: the same
artifacts in the work dir and the same checkpoint, tensor for tensor (bit for bit on the CPU).
Memory: one block's weights (two while the next is read), the cached hidden states (on the device
while they fit `--max-gpu-memory`, else in pinned CPU memory, moved one batch at a time), and one
batch of activations.

`walk_blocks` is that pass with each part optional, so the stand-alone stages stream too:
`lite calibrate` (forward and statistics only), `lite smooth` from existing statistics (weights only,
no forward) and `lite export` (weights read, scales folded, quantized, written; no forward).
"""

import copy
import ctypes
import hashlib
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lite.archs import arch_for, quantized_linears
from lite.calibrate import attach_observers, capture_block_inputs, removing, show_tokens_per_second, store_statistics
from lite.data import calibration_tokens
from lite.errors import LiteError
from lite.export import parse_size, quantization_config, quantize_block_, write_model_files
from lite.folders import staged_folder, write_marker
from lite.model import (LoadedModel, check_finite_tensor, config_hash, decoder_blocks, load_tokenizer, read_config,
                        resolve_dtype)
from lite.observers import ActSettings
from lite.qmodules import QLinear, QRMSNorm
from lite.quant import CHUNK_ELEMENTS, QUANT_DTYPES, quant_dtype_of, row_chunks
from lite.shards import ShardReader, ShardWriter, checkpoint_files
from lite.smooth import check_finite, migration_scales

DEFAULT_MAX_GPU_MEMORY = "8GiB"


def is_streamable(source: str) -> bool:
    """A local folder with config.json and safetensors weights."""
    source = str(source)
    return (os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json"))
            and bool(checkpoint_files(source)))


@dataclass
class StreamedModel(LoadedModel):
    """A model whose weights stay in its shards: `model` holds meta parameters and real buffers."""

    reader: ShardReader = None
    dtype: torch.dtype = None
    opened_at: float = 0.0  # perf_counter() when opening began, so that timings include it
    identity_s: float = 0.0  # seconds spent on `identity`


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name)
    if parameter:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def open_streamed(source: str, dtype: str = "auto", trust_remote_code: bool = False) -> StreamedModel | None:
    """The skeleton of a local safetensors model, or None when its blocks hold buffers we cannot rebuild."""
    from transformers import AutoModelForCausalLM

    opened_at = time.perf_counter()
    source = str(source)
    config = read_config(source, trust_remote_code)
    arch = arch_for(config)
    tokenizer = load_tokenizer(source, trust_remote_code)  # before any weight: a missing tokenizer fails fast
    reader = ShardReader(source)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype == "auto":
        # As from_pretrained: the config's dtype, else the checkpoint's first floating-point tensor's.
        floating = [e.dtype for e in reader.entries.values() if e.dtype.is_floating_point]
        torch_dtype = config.dtype if isinstance(config.dtype, torch.dtype) else (floating[0] if floating else torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    inside = arch.blocks + "."
    if any(name.startswith(inside) for name, _ in model.named_buffers()):
        return None
    # Non-persistent buffers (rotary inv_freq, Gemma's embed_scale) come from the config, not the
    # checkpoint: build the model without blocks and with a tiny vocabulary, and take them from it.
    small = copy.deepcopy(config)
    small.num_hidden_layers, small.vocab_size, small.pad_token_id = 0, 8, None
    if getattr(small, "layer_types", None) is not None:
        small.layer_types = []
    helper = dict(AutoModelForCausalLM.from_config(small, dtype=torch_dtype, trust_remote_code=trust_remote_code)
                  .named_buffers())
    for name, _ in list(model.named_buffers()):
        if name in helper:
            _set_tensor(model, name, helper[name].clone(), parameter=False)
        elif name in reader:
            _set_tensor(model, name, reader.read([name])[name], parameter=False)
        else:
            return None
    return StreamedModel(model, tokenizer, source, source, reader, torch_dtype, opened_at)


def _source_name(sm: StreamedModel, name: str) -> str:
    """The checkpoint tensor a state-dict entry is loaded from (a tied lm_head reads the embeddings)."""
    if getattr(sm.config, "tie_word_embeddings", False) and name == f"{sm.arch.lm_head}.weight":
        return f"{sm.arch.embed}.weight"
    return name


def streamed_weights_hash(sm: StreamedModel) -> str:
    """`lite.model.weights_hash` of the loaded model, from 16 elements per tensor read off the shards
    (many small reads: in parallel, which a cold disk serves far faster than one after another)."""

    def sample(item):
        name, t = item
        numel = t.numel()
        picks = list(range(0, numel, max(1, numel // 16)))[:16]
        values = sm.reader.read_elements(_source_name(sm, name), picks)
        return values.to(sm.dtype) if values.dtype.is_floating_point else values

    items = list(sm.model.state_dict().items())
    with ThreadPoolExecutor(16) as pool:
        samples = list(pool.map(sample, items))
    h = hashlib.sha256()
    for (name, _), values in zip(items, samples):
        h.update(name.encode())
        h.update(values.float().numpy().tobytes())
    return h.hexdigest()[:16]


def identity(sm: StreamedModel) -> dict:
    """What `WorkDir` records to tell models apart, equal to what the fully loaded model gives."""
    start = time.perf_counter()
    digest = streamed_weights_hash(sm)
    sm.identity_s = round(time.perf_counter() - start, 3)
    return {"source": sm.source, "config_hash": config_hash(sm.config), "weights_hash": digest}


def output_layout(sm: StreamedModel, quant_dtype: str, export_migration_scale: bool) -> list:
    """`[(name, shape, dtype)]` of the checkpoint `write_checkpoint` writes for the quantized model,
    in its order, from a quantized copy of the skeleton (the same swap `load_quantized` does)."""
    qmodel, arch, qdtype = copy.deepcopy(sm.model), sm.arch, quant_dtype_of(quant_dtype)
    for prefix, block in decoder_blocks(qmodel, arch).items():
        if not export_migration_scale:
            for pair in arch.norm_pairs:
                norm = block.get_submodule(pair.norm)
                block.set_submodule(pair.norm, QRMSNorm(norm.weight.shape[0], 1e-6, arch.norm_offset, qdtype,
                                                        norm.weight.dtype, device="meta"))
        for name in quantized_linears(arch, block):
            linear = block.get_submodule(name)
            block.set_submodule(name, QLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                              qdtype, linear.weight.dtype, export_migration_scale, device="meta"))
    tied = getattr(sm.config, "tie_word_embeddings", False)
    return [(name, tuple(t.shape), t.dtype) for name, t in qmodel.state_dict().items()
            if not (tied and name == f"{arch.lm_head}.weight")]


# ---------------------------------------------------------------------------- memory planning

def per_token_bytes(config, element_size: int) -> int:
    """An upper estimate of the activation bytes one token needs inside a block's forward with observers:
    the MLP's gate, up, act and product (`intermediate` wide, model dtype), the observer's fp32
    copy and abs of the widest input, and a few `hidden`-wide temporaries of attention and norms."""
    hidden, inter = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    return (4 * element_size + 8) * inter + (8 * element_size + 16) * hidden


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


class _Timer:
    def __init__(self, start: float):
        self.times, self.start = {}, start

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = round(self.times.get(stage, 0.0) + now - self.start, 3)
        self.start = now


def _check_options(quant_dtype, batch_size) -> None:
    if quant_dtype not in QUANT_DTYPES:
        raise LiteError(f"--quant-dtype {quant_dtype!r} is not one of: {', '.join(QUANT_DTYPES)}")
    if batch_size != "auto" and not (isinstance(batch_size, int) and batch_size >= 1):
        raise LiteError(f"--batch-size must be a positive integer or auto, got {batch_size!r}")


@dataclass(frozen=True)
class ExportSpec:
    """What `walk_blocks` writes when it exports: the lmdeploy layout with dynamic activations."""

    quant_dtype: str = "int8"
    export_migration_scale: bool = False
    max_shard_size: int | str = "5GB"


@torch.no_grad()
def walk_blocks(sm: StreamedModel, timer: _Timer, tokens: torch.Tensor | None = None, smoothing=None,
                act_absmax: dict | None = None, scales: dict | None = None, export: ExportSpec | None = None,
                out_folder: str | None = None, batch_size="auto", device="cpu",
                max_gpu_memory=DEFAULT_MAX_GPU_MEMORY) -> tuple[dict, dict, dict, dict]:
    """One pass over the blocks, each read from the shards once; what happens to a block depends on what is given:

    - `tokens` `(samples, seqlen)`: they run through the block with observers on it (statistics), and
      its outputs become the next block's inputs;
    - `smoothing`: migration scales from the block's weights and `act_absmax` (`{linear fqn: max|X|}`),
      or the statistics just taken when `act_absmax` is None;
    - `scales`: migration scales given (`{consumer fqn: s}`), used when `smoothing` is None;
    - `export`: the scales folded (or stored), the block quantized and written into shards in `out_folder`,
      with the embeddings, final norm, lm_head, config.json and tokenizer files.

    Returns `(inputs_stats, outputs_stats, migration scales computed, summary)`.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    model, arch, config, reader = sm.model, sm.arch, sm.config, sm.reader
    esize = torch.empty((), dtype=sm.dtype).element_size()
    blocks = decoder_blocks(model, arch)
    block_bytes = max(sum(p.numel() for p in b.parameters()) * esize for b in blocks.values())
    on_device, summary = True, {}
    if not cuda:
        _unmap_large_frees()
    if tokens is not None:
        budget = parse_size(max_gpu_memory) if cuda else 1 << 62
        samples, seqlen = tokens.shape
        per_sample = seqlen * per_token_bytes(config, esize)
        if cuda:
            on_device, batch_size = plan_memory(budget, block_bytes, seqlen * config.hidden_size * esize, samples,
                                                per_sample, batch_size)
        else:  # on the CPU: activations no larger than a block's weights; the batch size hardly changes the speed
            batch_size = max(1, min(samples, block_bytes // per_sample)) if batch_size == "auto" else batch_size
        summary.update(batch_size=batch_size, hidden_on_device=on_device)
    qdtype = quant_dtype_of(export.quant_dtype) if export is not None else None
    timer.lap("setup")

    read_pool, write_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    # On a GPU block i+1 is read while block i runs; on the CPU, where compute dwarfs reading, a read
    # ahead would only hold a second block in memory, so each read happens when its result is asked for.
    read_ahead = read_pool.submit if cuda else _Later
    copy_stream = torch.cuda.Stream(device) if cuda else None

    def fetch(prefix: str) -> dict[str, torch.Tensor]:
        """A block's weights on the device, in the model dtype (runs on the read thread)."""
        names = [f"{prefix}.{n}" for n, _ in blocks[prefix].named_parameters()]
        tensors = reader.read(names, pin_memory=cuda)
        if cuda:
            with torch.cuda.stream(copy_stream):
                tensors = {n: t.to(device, non_blocking=True) for n, t in tensors.items()}
            copy_stream.synchronize()
        return {n: t.to(sm.dtype) if t.is_floating_point() else t for n, t in tensors.items()}

    def copy_tail() -> None:
        """The final norm and (untied) lm_head from the checkpoint to the output, a chunk of rows at a time."""
        for name in tail_names:
            shape = reader.entries[name].shape
            for rows in row_chunks(shape[0], shape[1] if len(shape) > 1 else 1):
                part = reader.read_rows(name, rows.start, rows.stop).to(sm.dtype)
                check_finite_tensor(name, part, rows.start)
                writer.write(name, part, row_start=rows.start)

    def write(tensors: dict[str, torch.Tensor], ready) -> None:
        if ready is not None:
            ready.synchronize()
        for name, t in tensors.items():
            writer.write(name, t)

    def to_host(tensors: dict[str, torch.Tensor]):
        """CPU copies (pinned, asynchronous on a GPU) and the event that says they are complete."""
        if not cuda:
            return {n: t.detach().contiguous() for n, t in tensors.items()}, None
        host = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for n, t in tensors.items()}
        event = torch.cuda.Event()
        event.record()
        return host, event

    inputs_stats, outputs_stats, found_scales = {}, {}, {}
    prefixes = list(blocks)
    writer, tail_names, written = None, [], None
    if export is not None:
        writer = ShardWriter(out_folder, output_layout(sm, export.quant_dtype, export.export_migration_scale),
                             parse_size(export.max_shard_size))
        tail_names = [n for n in (f"{arch.final_norm}.weight", f"{arch.lm_head}.weight") if n in writer.where]
    pending = read_ahead(fetch, prefixes[0])
    hidden, kwargs, pinned = [], [], None
    progress = tqdm(prefixes, desc="blocks", unit="block", dynamic_ncols=True)
    try:
        if tokens is not None or writer is not None:
            # The embeddings (1 GB and more) pass through CPU memory a chunk of rows at a time: to the
            # output, and to the device for the model's own forward up to the first block.
            embed_name = f"{arch.embed}.weight"
            embed_shape = reader.entries[embed_name].shape
            embed = torch.empty(embed_shape, dtype=sm.dtype, device=device) if tokens is not None else None
            for rows in row_chunks(*embed_shape):
                part = reader.read_rows(embed_name, rows.start, rows.stop).to(sm.dtype)  # (rows, hidden)
                if embed is None:  # else checked once on the device below
                    check_finite_tensor(embed_name, part, rows.start)
                if writer is not None:
                    writer.write(embed_name, part, row_start=rows.start)
                if embed is not None:
                    embed[rows] = part.to(device)
            del part
            if embed is not None:
                check_finite_tensor(embed_name, embed)
        if tokens is not None:
            # Block 0's inputs: the model's own forward up to the first block (embeddings, rotary tables, masks).
            _set_tensor(model, embed_name, embed, parameter=True)
            del embed
            for name, b in list(model.named_buffers()):
                _set_tensor(model, name, b.to(device), parameter=False)
            # Hidden states that do not fit the device budget wait in one pinned CPU buffer.
            pinned = None if on_device or not cuda else torch.empty((samples, seqlen, config.hidden_size),
                                                                    dtype=sm.dtype, pin_memory=True)
            for first in range(0, samples, batch_size):
                chunk = tokens[first:first + batch_size]  # (batch, seqlen)
                h, kw = capture_block_inputs(model, arch, chunk, len(chunk), device)
                hidden.append(h[0] if pinned is None else pinned[first:first + len(chunk)].copy_(h[0]))
                kwargs.append(kw[0])
            _set_tensor(model, embed_name, torch.empty(embed_shape, dtype=sm.dtype, device="meta"), parameter=True)
            timer.lap("capture")

        for i, prefix in enumerate(progress):
            weights = pending.result()
            if i + 1 < len(prefixes):
                pending = read_ahead(fetch, prefixes[i + 1])
            elif writer is not None:  # the final norm and lm_head, copied while the last block runs
                pending = read_ahead(copy_tail)
            else:
                pending = None
            timer.lap("wait_read")
            block = blocks[prefix]
            for name, t in weights.items():
                if cuda:  # allocated on the copy stream: not to be reused before this stream's work is done
                    t.record_stream(torch.cuda.current_stream(device))
                _set_tensor(model, name, t, parameter=True)
            del weights
            for name, p in block.named_parameters():  # before the forward: a NaN is named where it is
                check_finite(f"{prefix}.{name}", p, "weight")
            if tokens is not None:
                observed_in, observed_out, handles = attach_observers(block, prefix, arch)
                with removing(handles):
                    for j, (h, kw) in enumerate(zip(hidden, kwargs)):
                        out = block(h.to(device, non_blocking=True), **kw)
                        out = out[0] if isinstance(out, tuple) else out
                        if on_device or not cuda:
                            hidden[j] = out
                        else:
                            h.copy_(out)
                timer.lap("forward")
                store_statistics(observed_in, observed_out, inputs_stats, outputs_stats)
            block_scales = {}
            if smoothing is not None:
                if act_absmax is None:
                    absmax = {fqn: stats.absmax for fqn, stats in observed_in.items()}
                else:
                    absmax = {f"{prefix}.{n}": act_absmax[f"{prefix}.{n}"].to(device)
                              for n in quantized_linears(arch, block)}
                block_scales = migration_scales({prefix: block}, arch, config, absmax, float(smoothing.alpha),
                                                smoothing.w_stat)
                found_scales.update({fqn: s.cpu() for fqn, s in block_scales.items()})
            elif scales:
                block_scales = {fqn: s.to(device) for fqn, s in scales.items() if fqn.startswith(prefix + ".")}
            if writer is not None:
                quantize_block_(block, prefix, arch, config, qdtype, block_scales, export.export_migration_scale)
            timer.lap("smooth_quantize")
            if writer is not None:
                outputs, ready = to_host(block.state_dict(prefix=prefix + "."))
                if written is not None:
                    written.result()  # at most one block waits for the disk
                written = write_pool.submit(write, outputs, ready)
                del outputs
            block.to("meta")
            timer.lap("write")
            show_tokens_per_second(progress, tokens, i + 1)
        del hidden, kwargs, pinned
        if pending is not None:
            pending.result()
        if writer is not None:
            if written is not None:
                written.result()
            writer.close()
            model.config.quantization_config = quantization_config(export.quant_dtype, export.export_migration_scale)
            write_model_files(out_folder, model.config, sm.dtype, sm.tokenizer, sm.folder)
    finally:
        progress.close()
        read_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if cuda:
        summary["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return inputs_stats, outputs_stats, found_scales, summary


def _print_timings(sm: StreamedModel, timer: _Timer, summary: dict) -> None:
    if os.environ.get("LITE_VERBOSE") != "1":  # set by --verbose
        return
    timer.lap("finish")
    summary = {**timer.times, "of_which_identity": sm.identity_s, **summary}
    print("timings " + " ".join(f"{k}={v}" for k, v in summary.items()))


def stream_smooth_quant(sm: StreamedModel, work, calib, smoothing, quant_dtype="int8", export_migration_scale=False,
                        max_shard_size="5GB", out_dir=None, batch_size="auto", device="cpu", dtype="auto",
                        max_gpu_memory=DEFAULT_MAX_GPU_MEMORY) -> str:
    """Calibrate, smooth and export in one pass over the blocks into `out_dir` (checked by the caller);
    returns it.

    Writes the same work-dir artifacts as `lite calibrate` and `lite smooth` (statistics, migration
    scales, manifest entries) and the same checkpoint as `lite export`.
    """
    from lite.pipeline import INPUTS_STATS, OUTPUTS_STATS, SCALES, calib_record, export_settings, smoothing_record

    timer = _Timer(sm.opened_at or time.perf_counter())
    _check_options(quant_dtype, batch_size)
    tokens = calibration_tokens(sm.tokenizer, calib.calib_dataset, calib.calib_samples, calib.calib_seqlen,
                                calib.seed, vocab_size=sm.config.vocab_size)
    with staged_folder(out_dir) as tmp:
        inputs_stats, outputs_stats, scales, summary = walk_blocks(
            sm, timer, tokens, smoothing, export=ExportSpec(quant_dtype, export_migration_scale, max_shard_size),
            out_folder=tmp, batch_size=batch_size, device=device, max_gpu_memory=max_gpu_memory)
        # Artifacts first, then the folder appears: a finished output folder always has its statistics.
        work.save("statistics", calib_record(calib, dtype), {INPUTS_STATS: inputs_stats, OUTPUTS_STATS: outputs_stats})
        work.save("migration_scales", smoothing_record(calib, smoothing, dtype), {SCALES: scales})
        settings = export_settings(work, "lmdeploy", quant_dtype, ActSettings(), export_migration_scale,
                                   max_shard_size, dtype, True, None)
        write_marker(tmp, work.path, settings)
    work.record("export", {**settings, "out_dir": out_dir, "streamed": True})
    _print_timings(sm, timer, summary)
    print(f"wrote {out_dir}")
    return out_dir


def stream_calibrate(sm: StreamedModel, work, calib, batch_size="auto", device="cpu", dtype="auto",
                     max_gpu_memory=DEFAULT_MAX_GPU_MEMORY) -> dict:
    """`lite calibrate` over the streamed blocks: the same statistics files and manifest entry as
    `pipeline.run_calibrate`; returns inputs_stats."""
    from lite.pipeline import INPUTS_STATS, OUTPUTS_STATS, calib_record

    timer = _Timer(sm.opened_at or time.perf_counter())
    _check_options("int8", batch_size)
    tokens = calibration_tokens(sm.tokenizer, calib.calib_dataset, calib.calib_samples, calib.calib_seqlen,
                                calib.seed, vocab_size=sm.config.vocab_size)
    inputs_stats, outputs_stats, _, summary = walk_blocks(sm, timer, tokens, batch_size=batch_size, device=device,
                                                          max_gpu_memory=max_gpu_memory)
    work.save("statistics", calib_record(calib, dtype), {INPUTS_STATS: inputs_stats, OUTPUTS_STATS: outputs_stats})
    _print_timings(sm, timer, summary)
    return inputs_stats


def stream_smooth(sm: StreamedModel, work, calib, smoothing, batch_size="auto", device="cpu", dtype="auto",
                  max_gpu_memory=DEFAULT_MAX_GPU_MEMORY) -> dict:
    """`lite smooth` over the streamed blocks: from the work dir's statistics when they may be reused (the
    blocks' weights are read, nothing runs forward), else calibrating in the same pass. The same
    artifacts and manifest entries as `pipeline.run_smooth`; returns the migration scales."""
    from lite.pipeline import INPUTS_STATS, OUTPUTS_STATS, SCALES, calib_record, reusable_statistics, smoothing_record

    timer = _Timer(sm.opened_at or time.perf_counter())
    stats = reusable_statistics(sm, work, calib, dtype)
    if stats is not None:
        _, _, scales, summary = walk_blocks(sm, timer, smoothing=smoothing, act_absmax=stats["absmax"], device=device)
    else:
        _check_options("int8", batch_size)
        tokens = calibration_tokens(sm.tokenizer, calib.calib_dataset, calib.calib_samples, calib.calib_seqlen,
                                    calib.seed, vocab_size=sm.config.vocab_size)
        inputs_stats, outputs_stats, scales, summary = walk_blocks(
            sm, timer, tokens, smoothing, batch_size=batch_size, device=device, max_gpu_memory=max_gpu_memory)
        work.save("statistics", calib_record(calib, dtype), {INPUTS_STATS: inputs_stats, OUTPUTS_STATS: outputs_stats})
    work.save("migration_scales", smoothing_record(calib, smoothing, dtype), {SCALES: scales})
    _print_timings(sm, timer, summary)
    return scales


def stream_export(sm: StreamedModel, work, scales: dict | None, quant_dtype="int8", export_migration_scale=False,
                  max_shard_size="5GB", out_dir=None, device="cpu", dtype="auto") -> str:
    """`lite export` (lmdeploy format, dynamic activations) over the streamed blocks into `out_dir` (checked
    by the caller): each block read, `scales` folded in (or stored), quantized and written; no forward
    pass. The same checkpoint and manifest entry as `pipeline.run_export`; returns the output folder."""
    from lite.pipeline import export_settings

    timer = _Timer(sm.opened_at or time.perf_counter())
    _check_options(quant_dtype, "auto")
    settings = export_settings(work, "lmdeploy", quant_dtype, ActSettings(), export_migration_scale, max_shard_size,
                               dtype, bool(scales), None)
    with staged_folder(out_dir) as tmp:
        _, _, _, summary = walk_blocks(sm, timer, scales=scales or {}, out_folder=tmp, device=device,
                                       export=ExportSpec(quant_dtype, export_migration_scale, max_shard_size))
        write_marker(tmp, work.path, settings)
    work.record("export", {**settings, "out_dir": out_dir, "streamed": True})
    _print_timings(sm, timer, summary)
    print(f"wrote {out_dir}")
    return out_dir
