"""The commands over a streamed local safetensors folder: each a list of steps run by `lite.sweep.sweep`
over a `lite.source.Shards` source, so that only one or two blocks' weights are in memory at a time.

- `stream_smooth_quant`: `[statistics, smoothquant, rtn]` in one pass, written as the blocks finish
  (static activations: `[statistics, smoothquant (folding), static_scales, rtn]`, still one read, the
  static scales on the sweep's second chain);
- `stream_calibrate`: `[statistics]`;
- `stream_smooth`: `[smoothquant]` from the work dir's statistics (weights only, no forward), or
  `[statistics, smoothquant]` when they must be made;
- `stream_export`: `[smoothquant (given scales), rtn]`; the only forward is the read-back's, on two
  windows of the text shipped with lite. It also exports a model loaded in memory (`tiny:`, folders
  that do not stream, recipes with transforms) through the same steps, over a `Loaded` source.

`stream_smooth_quant` without smoothing and with a recipe's record runs the W8A8 recipes of `lite run`.

Every format and activation scheme streams: lmdeploy, compressed-tensors with per-token or static
activation scales (then `[smoothquant (given scales, folded first), static_scales, rtn]` with the
calibration windows).

The result is the same as calibrate → smooth → export on the fully loaded model: the same artifacts
in the work dir and the same checkpoint, tensor for tensor (bit for bit on the CPU).

Every export ends with `readback_record` as its last step and, before the folder is published, the
read-back check block by block (`lite.steps.readback.check_streamed_readback`): the written folder, read by its
format's reader one block at a time, must compute what the in-memory quantized blocks computed.
"""

import os
import time

from lite.data import calibration_tokens, readback_batches, readback_tokens
from lite.formats import FORMATS, check_readback
from lite.steps.readback import ReadbackRecord, check_streamed_readback
from lite.folders import staged_folder, write_marker
from lite.observers import ActSettings
from lite.quant import quant_dtype_of
from lite.settings import calib_record, check_batch_size, check_quant_dtype, export_settings, smoothing_record
from lite.shards import checkpoint_files
from lite.source import Loaded, Shards, StreamedModel
from lite.steps.rtn import Rtn
from lite.steps.smoothquant import SmoothQuant
from lite.steps.static_scales import StaticScales
from lite.steps.stats import Statistics
from lite.sweep import DEFAULT_MAX_GPU_MEMORY, Timer, sweep


def is_streamable(source: str) -> bool:
    """A local folder with config.json and safetensors weights."""
    source = str(source)
    return (os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json"))
            and bool(checkpoint_files(source)))


def _check_options(quant_dtype, batch_size) -> None:
    check_quant_dtype(quant_dtype)
    check_batch_size(batch_size)


def _print_timings(sm: StreamedModel, timer: Timer, summary: dict) -> None:
    if os.environ.get("LITE_VERBOSE") != "1":  # set by --verbose
        return
    timer.lap("finish")
    summary = {**timer.times, "of_which_identity": getattr(sm, "identity_s", 0.0), **summary}
    print("timings " + " ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))


def _tokens(sm: StreamedModel, calib):
    return calibration_tokens(sm.tokenizer, calib.calib_dataset, calib.calib_samples, calib.calib_seqlen,
                              calib.seed, vocab_size=sm.config.vocab_size)


def _writer(folder, sm: StreamedModel, fmt: str, quant_dtype: str, export_migration_scale: bool, max_shard_size,
            marker, act: ActSettings = ActSettings()):
    return FORMATS[fmt].writer(folder, sm, sm.dtype, quant_dtype, export_migration_scale, max_shard_size, marker, act)


def _check_readback(folder, sm, tokens, record, device, max_gpu_memory, timer) -> None:
    check_streamed_readback(folder, sm, tokens[:1], record.hidden, device, max_gpu_memory)  # the sample `record` ran
    timer.lap("readback")


def stream_smooth_quant(sm: StreamedModel, work, calib, smoothing, quant_dtype="int8", export_migration_scale=False,
                        max_shard_size="5GB", out_dir=None, batch_size="auto", device="cpu", dtype="auto",
                        max_gpu_memory=DEFAULT_MAX_GPU_MEMORY, fmt="lmdeploy", act=ActSettings(),
                        record: dict | None = None) -> str:
    """Calibrate, smooth and export in one pass over the blocks into `out_dir` (checked by the caller);
    returns it. Writes the same work-dir artifacts as `lite calibrate` and `lite smooth` and the same
    checkpoint as `lite export`.

    Static activation scales observe the smoothed model: each block's factors are folded as soon as
    they are computed, and the static observers see a second forward of it on the sweep's second chain
    (the smoothed blocks' outputs), in the same read of the weights.

    `smoothing` None: no statistics and no SmoothQuant (a recipe without `smoothquant`); static scales
    then observe the float blocks. `record` (a recipe's) joins every manifest entry and the marker."""
    timer = Timer(sm.opened_at or time.perf_counter())
    _check_options(quant_dtype, batch_size)
    record = record or {}
    static = [StaticScales(act, quant_dtype_of(quant_dtype))] if act.static else []
    if smoothing is not None:
        stats, smooth = Statistics(), SmoothQuant(smoothing.alpha, smoothing.w_stat, fold=act.static)
        first, tokens = [stats, smooth], _tokens(sm, calib)
    else:  # only static scales need the calibration windows; else the read-back's two are the only forward
        first, tokens = [], _tokens(sm, calib) if act.static else readback_tokens(sm.tokenizer)
    with staged_folder(out_dir) as tmp:
        # The marker names the migration scales' record, which exists once they are saved: written last.
        writer = _writer(tmp, sm, fmt, quant_dtype, export_migration_scale, max_shard_size, None, act)
        readback = ReadbackRecord()
        steps = [*first, *static, Rtn(quant_dtype, export_migration_scale), readback]
        summary = sweep(Shards(sm), steps, tokens, writer, batch_size, device, max_gpu_memory, timer,
                        all_experts=calib.moe_calibrate_all_experts, second_chain=act.static and bool(first))
        _check_readback(tmp, sm, tokens, readback, device, max_gpu_memory, timer)
        # Artifacts first, then the folder appears: a finished output folder always has its statistics.
        if smoothing is not None:
            work.save("statistics", {**calib_record(calib, dtype), **record}, stats.artifacts())
            work.save("migration_scales", {**smoothing_record(calib, smoothing, dtype), **record}, smooth.artifacts())
        settings = {**export_settings(work, fmt, quant_dtype, act, export_migration_scale, max_shard_size, dtype,
                                      smoothing is not None, calib if act.static else None), **record}
        write_marker(tmp, work.path, settings)
    work.record("export", {**settings, "out_dir": out_dir})
    _print_timings(sm, timer, summary)
    print(f"wrote {out_dir}")
    return out_dir


def stream_calibrate(sm: StreamedModel, work, calib, batch_size="auto", device="cpu", dtype="auto",
                     max_gpu_memory=DEFAULT_MAX_GPU_MEMORY) -> dict:
    """`lite calibrate` over the streamed blocks: the same statistics files and manifest entry as
    `pipeline.run_calibrate`; returns inputs_stats."""
    timer = Timer(sm.opened_at or time.perf_counter())
    _check_options("int8", batch_size)
    stats = Statistics()
    summary = sweep(Shards(sm), [stats], _tokens(sm, calib), None, batch_size, device, max_gpu_memory, timer,
                    all_experts=calib.moe_calibrate_all_experts)
    work.save("statistics", calib_record(calib, dtype), stats.artifacts())
    _print_timings(sm, timer, summary)
    return stats.inputs


def stream_smooth(sm: StreamedModel, work, calib, smoothing, inputs: dict | None, batch_size="auto", device="cpu",
                  dtype="auto", max_gpu_memory=DEFAULT_MAX_GPU_MEMORY) -> dict:
    """`lite smooth` over the streamed blocks: from `inputs` (the work dir's statistics, when they may be
    reused: the blocks' weights are read, nothing runs forward), else calibrating in the same pass. The
    same artifacts and manifest entries as `pipeline.run_smooth`; returns the migration scales."""
    timer = Timer(sm.opened_at or time.perf_counter())
    if inputs is not None:
        smooth = SmoothQuant(smoothing.alpha, smoothing.w_stat, act_absmax=inputs["absmax"])
        summary = sweep(Shards(sm), [smooth], None, None, device=device, timer=timer)
    else:
        _check_options("int8", batch_size)
        stats, smooth = Statistics(), SmoothQuant(smoothing.alpha, smoothing.w_stat)
        summary = sweep(Shards(sm), [stats, smooth], _tokens(sm, calib), None, batch_size, device, max_gpu_memory,
                        timer, all_experts=calib.moe_calibrate_all_experts)
        work.save("statistics", calib_record(calib, dtype), stats.artifacts())
    work.save("migration_scales", smoothing_record(calib, smoothing, dtype), smooth.artifacts())
    _print_timings(sm, timer, summary)
    return smooth.found


def stream_export(sm, work, scales: dict | None, quant_dtype="int8", export_migration_scale=False,
                  max_shard_size="5GB", out_dir=None, device="cpu", dtype="auto", fmt="lmdeploy", act=ActSettings(),
                  calib=None, batch_size="auto", max_gpu_memory=DEFAULT_MAX_GPU_MEMORY,
                  record: dict | None = None) -> str:
    """`lite export` into `out_dir` (checked by the caller); returns it. `sm` is a `StreamedModel` (its
    blocks read from the shards; the folder read back block by block before it is published) or a
    `LoadedModel` (`tiny:`, a folder that does not stream: quantized in place; the folder read back whole
    and compared after it is written). The same steps and sweep either way, so the same checkpoint.

    Per-token activations: each block read, `scales` folded in (or stored), quantized and written; the
    only forward is the streamed read-back's (two windows of the shipped text). Static activations
    (compressed-tensors): `scales` are folded into each block first, the calibration windows of
    `calib` run through the smoothed block with static-scale observers, then it is quantized and written.
    `record` (a recipe's) joins the manifest entry and the marker.
    """
    streamed = isinstance(sm, StreamedModel)
    timer = Timer(getattr(sm, "opened_at", 0.0) or time.perf_counter())
    _check_options(quant_dtype, batch_size)
    settings = {**export_settings(work, fmt, quant_dtype, act, export_migration_scale, max_shard_size,
                                  dtype, bool(scales), calib), **(record or {})}
    source = Shards(sm) if streamed else Loaded(sm.model, sm.arch)
    rtn, record = Rtn(quant_dtype, export_migration_scale), ReadbackRecord()
    if act.static:
        steps = [SmoothQuant(scales=scales or {}, fold=True), StaticScales(act, quant_dtype_of(quant_dtype)), rtn]
        tokens = _tokens(sm, calib)
    else:  # the streamed read-back's two windows are the only forward
        steps, tokens = [SmoothQuant(scales=scales or {}), rtn], readback_tokens(sm.tokenizer) if streamed else None
    with staged_folder(out_dir) as tmp:
        writer = FORMATS[fmt].writer(tmp, sm, source.dtype, quant_dtype, export_migration_scale, max_shard_size,
                                     (work.path, settings), act)
        summary = sweep(source, steps + ([record] if streamed else []), tokens, writer, batch_size, device,
                        max_gpu_memory, timer)
        if streamed:
            _check_readback(tmp, sm, tokens, record, device, max_gpu_memory, timer)
    if not streamed:
        check_readback(sm.model, out_dir, readback_batches(sm.tokenizer, tokens))
    work.record("export", {**settings, "out_dir": out_dir})
    _print_timings(sm, timer, summary)
    print(f"wrote {out_dir}")
    return out_dir
