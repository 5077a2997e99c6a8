"""The stages as the CLI runs them: read artifacts from the work dir, compute, write artifacts back.

A work dir holds `inputs_stats.pth`, `outputs_stats.pth`, `migration_scales.pth`, the exported
checkpoint (`quantized/` unless `--out-dir` says otherwise) and `lite_manifest.json`, which records
which model the artifacts belong to and the settings each was made with, so that a later stage
reuses an artifact only when it matches.
"""

import json
import os
import shutil
import time
from dataclasses import asdict

import torch

from lite.archs import check_record, quantized_linears
from lite.calibrate import STATS
from lite.data import calibration_tokens, readback_batches
from lite.errors import LiteError
from lite.export import parse_size
from lite.folders import check_out_dir, remove_debris
from lite.formats import check_export_options, check_readback
from lite.model import LoadedModel, config_hash, decoder_blocks, load_model, resolve_dtype, weights_hash
from lite.observers import ActSettings
from lite.smooth import check_finite, check_folding_fits, migration_scales
from lite.source import Loaded
from lite.steps.smoothquant import SCALES
from lite.steps.stats import INPUTS_STATS, OUTPUTS_STATS
from lite.settings import (CalibSettings, SmoothSettings, calib_record, check_batch_size, check_quant_dtype,
                           describe_calib, export_settings, smoothing_record)
from lite.workdir import MANIFEST, WorkDir, locked_work_dir



def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def validate_inputs_stats(stats: dict, loaded: LoadedModel, path: str) -> None:
    """Every quantized linear has an absmax of its input width, finite; else name what is wrong."""
    if not isinstance(stats, dict) or "absmax" not in stats:
        raise LiteError(f"{path} is not a statistics file (expected keys {STATS}); re-run `lite calibrate`")
    absmax = stats["absmax"]
    missing = []
    for prefix, block in decoder_blocks(loaded.model, loaded.arch).items():
        for name in quantized_linears(loaded.arch, block):
            fqn, width = f"{prefix}.{name}", block.get_submodule(name).in_features
            if fqn not in absmax:
                missing.append(fqn)
                continue
            if tuple(absmax[fqn].shape) != (width,):
                raise LiteError(f"{path} was made from another model: {fqn} has {tuple(absmax[fqn].shape)} "
                                f"channels, the model {width}; re-run `lite calibrate` for this model")
            check_finite(fqn, absmax[fqn], f"{path} absmax")
    if missing:
        raise LiteError(f"{path} lacks statistics for {len(missing)} linears (first: {missing[0]}); it was made "
                        "from another model or is incomplete; re-run `lite calibrate` for this model")


def validate_scales(scales: dict, loaded: LoadedModel, path: str) -> None:
    linears = {f"{p}.{n}": b.get_submodule(n) for p, b in decoder_blocks(loaded.model, loaded.arch).items()
               for n in quantized_linears(loaded.arch, b)}
    for fqn, s in scales.items():
        if fqn not in linears:
            raise LiteError(f"{path} names {fqn}, which is not a linear of this model; re-run `lite smooth`")
        if tuple(s.shape) != (linears[fqn].in_features,):
            raise LiteError(f"{path}: {fqn} has a scale of shape {tuple(s.shape)}, expected "
                            f"({linears[fqn].in_features},); re-run `lite smooth` for this model")
        check_finite(fqn, s, f"{path} migration scale")


def check_device(device: str | None) -> str:
    """`device`, or the default one, after checking that it exists on this machine."""
    device = device or default_device()
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise LiteError(f"--device {device!r} is not a device; use cuda, cuda:N or cpu") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise LiteError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
    if kind not in ("cuda", "cpu"):
        raise LiteError(f"--device {device!r}: lite runs on cuda or cpu")
    return device


def check_seqlen(config, calib: CalibSettings) -> None:
    """Calibration windows no longer than the positions the model was trained for."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and calib.calib_seqlen > limit:
        raise LiteError(f"--calib-seqlen {calib.calib_seqlen} is beyond the model's max_position_embeddings "
                        f"({limit}); pass --calib-seqlen {limit} or less")


def resolve_calib(work_path: str, calib, from_record: bool = True) -> CalibSettings:
    """`calib` when complete; else (a dict with None for what the user did not give) completed from the
    settings the work dir's statistics were made with (when `from_record`), then from the defaults."""
    if isinstance(calib, CalibSettings):
        return calib
    given = {k: v for k, v in calib.items() if v is not None}
    recorded = {}
    if from_record:
        try:
            with open(os.path.join(work_path, MANIFEST)) as f:
                recorded = json.load(f)["artifacts"].get("statistics") or {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            recorded = {}  # no manifest yet; a corrupt one is reported when the work dir is opened
    taken = {k: recorded[k] for k in asdict(CalibSettings()) if k not in given and k in recorded}
    settings = CalibSettings(**{**taken, **given})
    if taken:
        flags = ", ".join("--" + k.replace("_", "-") for k in taken)
        print(f"{flags} as recorded for the statistics in {work_path}: calibration on {describe_calib(settings)}")
    return settings


def identity_of(loaded: LoadedModel) -> dict:
    return {"source": loaded.source, "config_hash": config_hash(loaded.config), "weights_hash": weights_hash(loaded.model)}


def open_source(model: str, work_path: str, dtype: str, trust_remote_code: bool, streamable: bool = True):
    """(model, WorkDir, streamed): a `StreamedModel` skeleton when MODEL is a local safetensors folder
    (or a hub id, downloaded first) that streams (and `streamable`), else the loaded model."""
    from lite import model as models
    from lite import source, stream

    model = str(model)
    if streamable and not model.startswith(models.TINY_PREFIX) and models.local_folder(model) is None:
        model = models.download(model)
    if not model.startswith(models.TINY_PREFIX):
        models.check_not_quantized(models.read_config(model, trust_remote_code), model)
    if streamable and stream.is_streamable(model):
        sm = source.open_streamed(model, dtype, trust_remote_code)
        if sm is not None:
            check_record(sm.arch, sm.model)
            check_folding_fits(sm.config, sm.arch, trust_remote_code)
            return sm, WorkDir(work_path, source.identity(sm)), True
    loaded = load_model(model, dtype, trust_remote_code)
    check_record(loaded.arch, loaded.model)
    check_folding_fits(loaded.config, loaded.arch, trust_remote_code)
    return loaded, WorkDir(work_path, identity_of(loaded)), False


def prepare_out_dir(out_dir: str | None, work_path: str, model: str) -> str:
    """The checked output folder (default WORK_DIR/quantized), with dead runs' temporaries of it removed."""
    out_dir = check_out_dir(out_dir or os.path.join(work_path, "quantized"), work_path,
                            model if os.path.isdir(str(model)) else None)
    remove_debris(os.path.dirname(out_dir), os.path.basename(out_dir))
    return out_dir


def check_disk_space(loaded, out_dir: str) -> None:
    """Refuse before any work when the output's file system lacks room for the checkpoint (int8/fp8
    weights inside the blocks, the rest in the model dtype)."""
    esize = torch.empty((), dtype=getattr(loaded, "dtype", None) or next(loaded.model.parameters()).dtype).element_size()
    needed = 0
    inside = loaded.arch.blocks + "."
    for name, p in loaded.model.named_parameters():
        needed += p.numel() * (1 if name.startswith(inside) and p.dim() == 2 else esize)
    parent = os.path.dirname(out_dir)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise LiteError(f"not enough free disk space for the checkpoint in {parent}: about {needed / 1e9:.2f} GB "
                        f"needed, {free / 1e9:.2f} GB free; free some space or pass another --out-dir")


# ---------------------------------------------------------------------------- stages

def run_calibrate(loaded: LoadedModel, work: WorkDir, calib: CalibSettings, batch_size: int, device: str,
                  dtype: str) -> dict:
    """Collect statistics and write the stats files; returns inputs_stats."""
    from lite.steps.stats import Statistics
    from lite.sweep import sweep

    tokens = calibration_tokens(loaded.tokenizer, calib.calib_dataset, calib.calib_samples,
                                calib.calib_seqlen, calib.seed, loaded.config.vocab_size)
    stats = Statistics()
    sweep(Loaded(loaded.model, loaded.arch), [stats], tokens, batch_size=batch_size, device=device,
          all_experts=calib.moe_calibrate_all_experts)
    work.save("statistics", calib_record(calib, dtype), stats.artifacts())
    return stats.inputs


def reusable_statistics(loaded, work, calib, dtype) -> dict | None:
    """inputs_stats from the work dir when lite made them with these settings from the same data, validated
    against `loaded` (a LoadedModel or a streamed skeleton); None when they must be made again."""
    if not work.reusable("statistics", calib_record(calib, dtype), (INPUTS_STATS, OUTPUTS_STATS),
                         "calibrating again"):
        return None
    stats = work.load(INPUTS_STATS)
    validate_inputs_stats(stats, loaded, work.file(INPUTS_STATS))
    print(f"reusing {work.file(INPUTS_STATS)} ({describe_calib(calib)})")
    return stats


def ensure_statistics(loaded, work, calib, batch_size, device, dtype) -> dict:
    """inputs_stats from the work dir when they may be reused, else calibrate."""
    stats = reusable_statistics(loaded, work, calib, dtype)
    return stats if stats is not None else run_calibrate(loaded, work, calib, batch_size, device, dtype)


def run_smooth(loaded, work, calib, smoothing, batch_size, device, dtype) -> dict:
    stats = ensure_statistics(loaded, work, calib, batch_size, device, dtype)
    settings = smoothing_record(calib, smoothing, dtype)
    if smoothing.auto:
        from lite.steps.alpha_search import search_alphas

        tokens = calibration_tokens(loaded.tokenizer, calib.calib_dataset, calib.calib_samples,
                                    calib.calib_seqlen, calib.seed, loaded.config.vocab_size)
        scales, chosen = search_alphas(loaded.model, loaded.arch, stats["absmax"], smoothing.w_stat,
                                       smoothing.quant_dtype, tokens, batch_size, device)
        print("alpha per block: " + ", ".join(f"{prefix.rpartition('.')[2]}: {a}" for prefix, a in chosen.items()))
        work.save("migration_scales", {**settings, "chosen_alphas": chosen}, {SCALES: scales})
        return scales
    blocks = decoder_blocks(loaded.model, loaded.arch)
    scales = migration_scales(blocks, loaded.arch, loaded.config, stats["absmax"], smoothing.alpha, smoothing.w_stat)
    work.save("migration_scales", settings, {SCALES: scales})
    return scales


def reusable_scales(loaded, work, calib, smoothing, dtype) -> dict | None:
    if not work.reusable("migration_scales", smoothing_record(calib, smoothing, dtype), (SCALES,),
                         "computing them again"):
        return None
    scales = work.load(SCALES)
    validate_scales(scales, loaded, work.file(SCALES))
    print(f"reusing {work.file(SCALES)}")
    return scales


def ensure_scales(loaded, work, calib, smoothing, batch_size, device, dtype) -> dict:
    scales = reusable_scales(loaded, work, calib, smoothing, dtype)
    return scales if scales is not None else run_smooth(loaded, work, calib, smoothing, batch_size, device, dtype)


def run_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size, out_dir,
               fmt="lmdeploy", act=ActSettings(), calib=None, batch_size=4, device="cpu", dtype="auto") -> str:
    """Quantize the loaded model and write it in `fmt` to `out_dir` (checked by `prepare_out_dir`), through
    the same sweep and steps as a streamed export (`stream.stream_export`), then read the folder back and
    compare logits.

    `calib` (the calibration settings) gives the windows for static activation scales and the
    read-back check; it is required for static scales.
    """
    from lite import stream

    if act.static and calib is None:
        raise LiteError("--act-scheme static needs calibration windows; run `lite calibrate` on this work dir "
                        "first (its settings are reused) or use `lite smooth_quant`")
    return stream.stream_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size, out_dir,
                                device, dtype, fmt, act, calib, batch_size)


def check_export_flags(quant_dtype, fmt, act, export_migration_scale, max_shard_size) -> None:
    check_quant_dtype(quant_dtype)
    check_export_options(fmt, act, export_migration_scale)
    if parse_size(max_shard_size) <= 0:
        raise LiteError(f"--max-shard-size must be positive, got {max_shard_size!r}")


def calibrate(model, work_dir, calib, batch_size=4, device=None, dtype="auto", trust_remote_code=False) -> None:
    """`lite calibrate`. `calib`: CalibSettings, or a dict of the given ones (None: the default)."""
    from lite import stream

    device, _ = check_device(device), resolve_dtype(dtype)
    check_batch_size(batch_size)
    with locked_work_dir(work_dir) as path:
        calib = resolve_calib(path, calib, from_record=False)
        loaded, work, streamed = open_source(model, path, dtype, trust_remote_code)
        check_seqlen(loaded.config, calib)
        if streamed:
            stream.stream_calibrate(loaded, work, calib, batch_size, device, dtype)
        else:
            run_calibrate(loaded, work, calib, 4 if batch_size == "auto" else batch_size, device, dtype)
        print(f"wrote {work.file(INPUTS_STATS)} and {work.file(OUTPUTS_STATS)}")


def smooth(model, work_dir, calib, smoothing: SmoothSettings, batch_size=4, device=None, dtype="auto",
           trust_remote_code=False) -> None:
    """`lite smooth`. Calibration settings not given default to those of the work dir's statistics."""
    from lite import stream

    device, _ = check_device(device), resolve_dtype(dtype)
    check_batch_size(batch_size)
    with locked_work_dir(work_dir) as path:
        calib = resolve_calib(path, calib)
        # The alpha search runs the whole model; fixed alphas read one block's weights at a time.
        loaded, work, streamed = open_source(model, path, dtype, trust_remote_code, streamable=not smoothing.auto)
        check_seqlen(loaded.config, calib)
        if streamed:
            stream.stream_smooth(loaded, work, calib, smoothing, reusable_statistics(loaded, work, calib, dtype),
                                 batch_size, device, dtype)
        else:
            run_smooth(loaded, work, calib, smoothing, 4 if batch_size == "auto" else batch_size, device, dtype)
        print(f"wrote {work.file(SCALES)}")


def recorded_calib(work: WorkDir) -> CalibSettings | None:
    """The calibration settings the work dir's statistics were made with, if lite made them."""
    recorded = work.settings_of("statistics")
    if recorded is None:
        return None
    return CalibSettings(**{k: recorded[k] for k in asdict(CalibSettings()) if k in recorded})


def export(model, work_dir, quant_dtype="int8", export_migration_scale=False, max_shard_size="5GB", out_dir=None,
           dtype="auto", trust_remote_code=False, fmt="lmdeploy", act=ActSettings(), no_smooth=False,
           batch_size=4, device=None) -> str:
    """`lite export`: the work dir's migration scales (when lite made them and not --no-smooth) folded or stored."""
    from lite import stream

    check_export_flags(quant_dtype, fmt, act, export_migration_scale, max_shard_size)
    device, _ = check_device(device), resolve_dtype(dtype)
    check_batch_size(batch_size)
    with locked_work_dir(work_dir) as path:
        out_dir = prepare_out_dir(out_dir, path, model)
        loaded, work, streamed = open_source(model, path, dtype, trust_remote_code)
        check_disk_space(loaded, out_dir)
        scales = None
        if no_smooth:
            pass
        elif work.reusable("migration_scales", {}, (SCALES,), "not using it"):
            scales = work.load(SCALES)
            validate_scales(scales, loaded, work.file(SCALES))
            searched_for = (work.settings_of("migration_scales") or {}).get("quant_dtype")
            if searched_for not in (None, quant_dtype):
                print(f"note: {SCALES} was searched (--alpha auto) for {searched_for}, not {quant_dtype}; run "
                      f"`lite smooth --alpha auto --quant-dtype {quant_dtype}` first for the best {quant_dtype} result")
        elif os.path.isfile(work.file(SCALES)):
            raise LiteError(f"{work.file(SCALES)} was not made by lite for this work dir (or changed since); run "
                            "`lite smooth` to make it again, or pass --no-smooth to export without smoothing")
        else:
            print(f"note: no {SCALES} in {path}: exporting without SmoothQuant (run `lite smooth` first to smooth; "
                  "--no-smooth says this is intended)" + ("; every migration_scale will be ones"
                                                          if export_migration_scale else ""))
        if streamed:
            calib = recorded_calib(work) if act.static else None
            if act.static and calib is None:
                raise LiteError("--act-scheme static needs calibration windows; run `lite calibrate` on this work dir "
                                "first (its settings are reused) or use `lite smooth_quant`")
            return stream.stream_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size,
                                        out_dir, device, dtype, fmt, act, calib, batch_size)
        return run_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size, out_dir,
                          fmt, act, recorded_calib(work) if act.static else None,
                          4 if batch_size == "auto" else batch_size, device, dtype)


def smooth_quant(model, work_dir, calib, smoothing: SmoothSettings, quant_dtype="int8",
                 export_migration_scale=False, max_shard_size="5GB", out_dir=None, batch_size=4, device=None,
                 dtype="auto", trust_remote_code=False, fmt="lmdeploy", act=ActSettings(), no_smooth=False,
                 max_gpu_memory="8GiB") -> str:
    """`lite smooth_quant`: calibrate, smooth and export, reusing what the work dir holds that matches."""
    from lite import stream

    check_export_flags(quant_dtype, fmt, act, export_migration_scale, max_shard_size)
    device, _ = check_device(device), resolve_dtype(dtype)
    check_batch_size(batch_size)
    if parse_size(max_gpu_memory) <= 0:
        raise LiteError(f"--max-gpu-memory must be positive, got {max_gpu_memory!r}")
    with locked_work_dir(work_dir) as path:
        out_dir = prepare_out_dir(out_dir, path, model)
        calib = resolve_calib(path, calib)
        streamable = not no_smooth and not smoothing.auto
        loaded, work, streamed = open_source(model, path, dtype, trust_remote_code, streamable=streamable)
        check_seqlen(loaded.config, calib)
        check_disk_space(loaded, out_dir)
        if streamed:
            scales = reusable_scales(loaded, work, calib, smoothing, dtype)
            if scales is None:
                inputs = reusable_statistics(loaded, work, calib, dtype)
                if inputs is None:
                    # Nothing to reuse: calibrate, smooth and export in one streamed pass over the blocks.
                    return stream.stream_smooth_quant(loaded, work, calib, smoothing, quant_dtype,
                                                      export_migration_scale, max_shard_size, out_dir, batch_size,
                                                      device, dtype, max_gpu_memory, fmt, act)
                scales = stream.stream_smooth(loaded, work, calib, smoothing, inputs, batch_size, device, dtype,
                                              max_gpu_memory)
            # From reused statistics or scales: a pass that exports (and observes static scales).
            return stream.stream_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size,
                                        out_dir, device, dtype, fmt, act, calib, batch_size, max_gpu_memory)
        batch_size = 4 if batch_size == "auto" else batch_size
        scales = None if no_smooth else ensure_scales(loaded, work, calib, smoothing, batch_size, device, dtype)
        return run_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size, out_dir,
                          fmt, act, calib, batch_size, device, dtype)


def run_recipe(recipe_path, model, work_dir, calib_given: dict, out_dir=None, max_shard_size="5GB", batch_size=4,
               device=None, dtype="auto", trust_remote_code=False) -> str:
    """`lite run`: the recipe's steps, then its format (lite/recipe.py), over a local safetensors folder
    streamed block by block (a hub id is downloaded first); recipes with transforms, and models that do
    not stream (`tiny:`), run on the model loaded in memory.

    Statistics and migration scales are made afresh and saved to the work dir with the recipe in their
    records; the checkpoint goes to `out_dir` (default WORK_DIR/quantized), read back and compared.
    """
    from lite import stream
    from lite.formats import FORMATS
    from lite.recipe import TRANSFORMS, calib_of, load
    from lite.source import Shards
    from lite.steps import create
    from lite.steps.smoothquant import SmoothQuant
    from lite.steps.stats import Statistics
    from lite.steps.transforms import transform_
    from lite.sweep import DEFAULT_MAX_GPU_MEMORY, sweep

    recipe = load(recipe_path)
    calib = calib_of(recipe, calib_given)
    if recipe.weight_only:
        return quantize_weights(model, work_dir, [(n, dict(s)) for n, s in recipe.steps], recipe.format, calib,
                                out_dir, max_shard_size, batch_size, device, dtype, trust_remote_code,
                                record=recipe.record())
    rtn = recipe.settings_of("rtn") or {}
    gptq = recipe.settings_of("gptq")  # W8A8 with GPTQ-rounded weights (quant_dtype int8)
    quant_dtype = rtn.get("quant_dtype", "int8") if gptq is None else gptq["quant_dtype"]
    export_migration_scale = bool(rtn.get("export_migration_scale", False))
    static = recipe.settings_of("static_scales")
    act = ActSettings("static", **static) if static is not None else ActSettings()
    check_export_flags(quant_dtype, recipe.format, act, export_migration_scale, max_shard_size)
    device, _ = check_device(device), resolve_dtype(dtype)
    check_batch_size(batch_size)
    batch_size = 4 if batch_size == "auto" else batch_size
    with locked_work_dir(work_dir) as path:
        out_dir = prepare_out_dir(out_dir, path, model)
        transforms = [create(name, **settings) for name, settings in recipe.steps if name in TRANSFORMS]
        # The transforms change the embeddings and lm_head as well as the blocks: they run on the loaded
        # model; every other recipe streams a local folder block by block.
        loaded, work, streamed = open_source(model, path, dtype, trust_remote_code, streamable=not transforms)
        check_seqlen(loaded.config, calib)
        check_disk_space(loaded, out_dir)
        smoothing = recipe.settings_of("smoothquant")
        if streamed and gptq is None:
            return stream.stream_smooth_quant(loaded, work, calib, None if smoothing is None else
                                              SmoothSettings(**smoothing), quant_dtype, export_migration_scale,
                                              max_shard_size, out_dir, batch_size, device, dtype, fmt=recipe.format,
                                              act=act, record=recipe.record())
        if transforms:
            transform_(loaded.model, transforms)
        tokens = calibration_tokens(loaded.tokenizer, calib.calib_dataset, calib.calib_samples, calib.calib_seqlen,
                                    calib.seed, loaded.config.vocab_size)
        scales = None
        records = {**calib_record(calib, dtype), **recipe.record()}
        if gptq is not None:
            # One sweep: statistics, migration scales, then GPTQ on the smoothed block, written as it goes.
            from lite.folders import staged_folder, write_marker
            from lite.steps.readback import ReadbackRecord, check_streamed_readback

            source = Shards(loaded) if streamed else Loaded(loaded.model, loaded.arch)
            steps = [Statistics(), SmoothQuant(**smoothing)] if smoothing is not None else []
            steps.append(create("gptq", **gptq))
            readback = ReadbackRecord()
            if streamed:
                steps.append(readback)
            with staged_folder(out_dir) as tmp:
                writer = FORMATS[recipe.format].writer(tmp, loaded, source.dtype, quant_dtype, False, max_shard_size,
                                                       None, act)
                sweep(source, steps, tokens, writer, batch_size, device,
                      all_experts=calib.moe_calibrate_all_experts)
                if streamed:  # before the folder is published: the written blocks compute what was quantized
                    check_streamed_readback(tmp, loaded, tokens[:1], readback.hidden, device, DEFAULT_MAX_GPU_MEMORY)
                if smoothing is not None:
                    work.save("statistics", records, steps[0].artifacts())
                    work.save("migration_scales", {**records, **SmoothSettings(**smoothing).record()},
                              steps[1].artifacts())
                settings = {**export_settings(work, recipe.format, quant_dtype, act, False, max_shard_size, dtype,
                                              smoothing is not None, calib), **recipe.record()}
                write_marker(tmp, work.path, settings)
            if not streamed:
                check_readback(loaded.model, out_dir, readback_batches(loaded.tokenizer, tokens))
            work.record("export", {**settings, "out_dir": out_dir})
            print(f"wrote {out_dir}")
            return out_dir
        if smoothing is not None:
            stats, smooth = Statistics(), SmoothQuant(**smoothing)
            sweep(Loaded(loaded.model, loaded.arch), [stats, smooth], tokens, batch_size=batch_size, device=device,
                  all_experts=calib.moe_calibrate_all_experts)
            work.save("statistics", records, stats.artifacts())
            work.save("migration_scales", {**records, **SmoothSettings(**smoothing).record()}, smooth.artifacts())
            scales = smooth.found
        return stream.stream_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size, out_dir,
                                    device, dtype, recipe.format, act, calib, batch_size, record=recipe.record())


def quantize_weights(model, work_dir, steps: list, fmt: str, calib, out_dir=None, max_shard_size="5GB",
                     batch_size="auto", device=None, dtype="auto", trust_remote_code=False, max_gpu_memory="8GiB",
                     record: dict | None = None) -> str:
    """Weight-only quantization (`lite auto_gptq`, `lite auto_awq`, weight-only recipes): `steps`
    `[(name, settings)]`, model-preparation transforms, optionally `awq`'s scale search, then the
    quantizing step (`gptq`, or `rtn` with `bits`), in one
    sweep over the blocks streamed from a local safetensors folder (a hub id is downloaded first), each
    finished block written to `out_dir` in `fmt`. With transforms, or when the folder does not stream,
    the model is loaded; a loaded model's folder is read back and compared with the in-memory one.
    `record` (a recipe's) joins the manifest's and the marker's settings.
    """
    from lite import weight_only
    from lite.folders import staged_folder
    from lite.steps.readback import ReadbackRecord, check_streamed_readback
    from lite.recipe import TRANSFORMS
    from lite.source import Shards
    from lite.steps import create
    from lite.steps.transforms import transform_
    from lite.sweep import Timer, sweep

    (name, settings) = steps[-1]
    transforms = [(n, s) for n, s in steps[:-1] if n in TRANSFORMS]
    scheme = weight_only.WeightScheme(settings.get("bits", 4), settings.get("group_size", 128),
                                      settings.get("symmetric", True), settings.get("channel_fallback", False))
    weight_only.check_weight_format(fmt, scheme)
    # Steps of the sweep (refusing bad settings now): awq's search, if any, then the quantizing step.
    sweep_steps = [create(n, **s) for n, s in steps[:-1] if n not in TRANSFORMS] + \
        [create(name, **settings, scale_dtype=weight_only.scale_dtype_setting(fmt))]
    assert all(n in (*TRANSFORMS, "awq") for n, _ in steps[:-1]), f"unexpected steps before {name}: {steps}"
    device, _ = check_device(device), resolve_dtype(dtype)
    check_batch_size(batch_size)
    for flag, size in (("--max-shard-size", max_shard_size), ("--max-gpu-memory", max_gpu_memory)):
        if parse_size(size) <= 0:
            raise LiteError(f"{flag} must be positive, got {size!r}")
    with locked_work_dir(work_dir) as path:
        out_dir = prepare_out_dir(out_dir, path, model)
        loaded, work, streamed = open_source(model, path, dtype, trust_remote_code, streamable=not transforms)
        timer = Timer(getattr(loaded, "opened_at", None) or time.perf_counter())
        weight_only.check_weight_shapes(fmt, scheme, loaded.model)
        check_seqlen(loaded.config, calib)
        check_disk_space(loaded, out_dir)
        if transforms:
            transform_(loaded.model, [create(n, **s) for n, s in transforms])
        tokens = calibration_tokens(loaded.tokenizer, calib.calib_dataset, calib.calib_samples, calib.calib_seqlen,
                                    calib.seed, loaded.config.vocab_size)
        recorded = {"format": fmt, "steps": [[n, s] for n, s in steps], "max_shard_size": max_shard_size,
                    "dtype": dtype, "calibration": calib_record(calib, dtype), **(record or {})}
        source = Shards(loaded) if streamed else Loaded(loaded.model, loaded.arch)
        if not streamed and batch_size == "auto":
            batch_size = 4
        readback = ReadbackRecord()
        with staged_folder(out_dir) as tmp:
            writer = weight_only.streaming_writer(tmp, loaded.model, fmt, scheme, max_shard_size, source.dtype,
                                                  loaded.tokenizer, loaded.folder, (work.path, recorded),
                                                  "mse" if settings.get("mse") else "minmax")
            summary = sweep(source, sweep_steps + ([readback] if streamed else []), tokens, writer, batch_size,
                            device, max_gpu_memory, timer, all_experts=calib.moe_calibrate_all_experts)
            if streamed:  # before the folder is published: the written blocks compute what was quantized
                check_streamed_readback(tmp, loaded, tokens[:1], readback.hidden, device, max_gpu_memory)
                timer.lap("readback")
        if not streamed:
            check_readback(loaded.model, out_dir, readback_batches(loaded.tokenizer, tokens))
        work.record("export", {**recorded, "out_dir": out_dir})
        if os.environ.get("LITE_VERBOSE") == "1":
            timer.lap("finish")
            print("timings " + " ".join(f"{k}={v}" for k, v in {**timer.times, **summary}.items()
                                        if not isinstance(v, dict)))
        print(f"wrote {out_dir}")
        return out_dir
