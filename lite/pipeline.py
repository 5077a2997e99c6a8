"""The stages as the CLI runs them: read artifacts from the work dir, compute, write artifacts back.

A work dir holds `inputs_stats.pth`, `outputs_stats.pth`, `migration_scales.pth`, the exported
checkpoint (`quantized/` unless `--out-dir` says otherwise) and `lite_manifest.json`, which records
which model the artifacts belong to and the settings each was made with, so that a later stage
reuses an artifact only when it matches.
"""

import json
import os
from dataclasses import asdict, dataclass

import torch

from lite import __version__
from lite.archs import quantized_linears
from lite.calibrate import STATS, collect_statistics
from lite.data import calibration_tokens
from lite.errors import LiteError
from lite.formats import check_export_options, check_readback, quantize_and_write
from lite.model import LoadedModel, config_hash, decoder_blocks, load_model, weights_hash
from lite.observers import ActSettings
from lite.smooth import W_STATS, check_finite, migration_scales
from lite.quant import QUANT_DTYPES

MANIFEST = "lite_manifest.json"
INPUTS_STATS, OUTPUTS_STATS, SCALES = "inputs_stats.pth", "outputs_stats.pth", "migration_scales.pth"


@dataclass(frozen=True)
class CalibSettings:
    calib_dataset: str = "wikitext2"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.calib_samples, int) and self.calib_samples >= 1):
            raise LiteError(f"--calib-samples must be a positive integer, got {self.calib_samples!r}")
        if not (isinstance(self.calib_seqlen, int) and self.calib_seqlen >= 2):
            raise LiteError(f"--calib-seqlen must be an integer >= 2, got {self.calib_seqlen!r}")


@dataclass(frozen=True)
class SmoothSettings:
    alpha: float | str = 0.3  # chosen by measurement: README.md, "Choosing the defaults"; or "auto"
    w_stat: str = "lmdeploy"
    # What `--alpha auto` quantizes its candidates to; fixed alphas do not depend on it.
    quant_dtype: str = "int8"

    def __post_init__(self):
        if self.alpha != "auto":
            try:
                alpha = float(self.alpha)
            except (TypeError, ValueError):
                alpha = None
            if alpha is None or not 0.0 <= alpha <= 1.0:
                raise LiteError(f"--alpha must be auto or lie in [0, 1], got {self.alpha!r}")
            object.__setattr__(self, "alpha", alpha)
        if self.w_stat not in W_STATS:
            raise LiteError(f"--w-stat {self.w_stat!r} is not one of: {', '.join(W_STATS)}")
        check_quant_dtype(self.quant_dtype)

    @property
    def auto(self) -> bool:
        return self.alpha == "auto"

    def record(self) -> dict:
        """The settings migration scales depend on, as the manifest records them."""
        settings = asdict(self)
        if not self.auto:
            del settings["quant_dtype"]
        return settings


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------- the work dir

class WorkDir:
    """The work dir and its manifest, bound to one model."""

    def __init__(self, path: str, loaded: LoadedModel | None, identity: dict | None = None):
        """`identity` (source, config_hash, weights_hash) stands in for `loaded` when the model is streamed."""
        self.path = os.path.abspath(str(path))
        self.identity = identity or {"source": loaded.source, "config_hash": config_hash(loaded.config),
                                     "weights_hash": weights_hash(loaded.model)}
        manifest = os.path.join(self.path, MANIFEST)
        if os.path.isfile(manifest):
            with open(manifest) as f:
                self.manifest = json.load(f)
            theirs = self.manifest.get("model", {})
            if {k: theirs.get(k) for k in ("config_hash", "weights_hash")} != \
                    {k: self.identity[k] for k in ("config_hash", "weights_hash")}:
                raise LiteError(f"work dir {self.path} holds artifacts of another model ({theirs.get('source')}); "
                                "use another --work-dir or empty this one")
        else:
            if os.path.isdir(self.path) and any(
                    name == "config.json" or name.endswith(".safetensors") for name in os.listdir(self.path)):
                raise LiteError(f"work dir {self.path} holds a model checkpoint not written by lite; "
                                "pass an empty or new --work-dir so that nothing there is overwritten")
            self.manifest = {"model": self.identity, "artifacts": {}}

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def settings_of(self, artifact: str) -> dict | None:
        return self.manifest["artifacts"].get(artifact)

    def save(self, artifact: str, settings: dict, tensors: dict[str, object]) -> None:
        """Write artifact files (`{filename: obj}`) atomically, then record them in the manifest."""
        os.makedirs(self.path, exist_ok=True)
        for filename, obj in tensors.items():
            tmp = self.file(f".{filename}.tmp")
            torch.save(obj, tmp)
            os.replace(tmp, self.file(filename))
        self.record(artifact, settings)

    def record(self, artifact: str, settings: dict) -> None:
        self.manifest["artifacts"][artifact] = {**settings, "lite_version": __version__}
        os.makedirs(self.path, exist_ok=True)  # export with --out-dir elsewhere may be the first write here
        tmp = self.file(f".{MANIFEST}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.manifest, f, indent=2, sort_keys=True)
        os.replace(tmp, self.file(MANIFEST))

    def matches(self, artifact: str, settings: dict, files: tuple[str, ...]) -> bool:
        recorded = self.settings_of(artifact)
        return (recorded is not None and all(recorded.get(k) == v for k, v in settings.items())
                and all(os.path.isfile(self.file(f)) for f in files))


def _load_tensors(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file; report which file it was
        raise LiteError(f"could not read {path} ({type(e).__name__}: {e}); delete it and re-run") from e


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


# ---------------------------------------------------------------------------- stages

def run_calibrate(loaded: LoadedModel, work: WorkDir, calib: CalibSettings, batch_size: int, device: str,
                  dtype: str) -> dict:
    """Collect statistics and write both stats files; returns inputs_stats."""
    tokens = calibration_tokens(loaded.tokenizer, calib.calib_dataset, calib.calib_samples,
                                calib.calib_seqlen, calib.seed, loaded.config.vocab_size)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise LiteError(f"--batch-size must be a positive integer, got {batch_size!r}")
    inputs, outputs = collect_statistics(loaded.model, loaded.arch, tokens, batch_size, device)
    work.save("statistics", {**asdict(calib), "dtype": dtype}, {INPUTS_STATS: inputs, OUTPUTS_STATS: outputs})
    return inputs


def reusable_statistics(loaded, work, calib, dtype) -> dict | None:
    """inputs_stats from the work dir when made with these settings (or by another tool), validated
    against `loaded` (a LoadedModel or a streamed skeleton); None when they must be made again."""
    settings = {**asdict(calib), "dtype": dtype}
    path = work.file(INPUTS_STATS)
    recorded = work.settings_of("statistics")
    if os.path.isfile(path) and (recorded is None or work.matches("statistics", settings, (INPUTS_STATS,))):
        stats = _load_tensors(path)
        validate_inputs_stats(stats, loaded, path)
        return stats
    if recorded is not None:
        print(f"statistics in {work.path} were made with other settings; calibrating again")
    return None


def ensure_statistics(loaded, work, calib, batch_size, device, dtype) -> dict:
    """inputs_stats from the work dir when they may be reused, else calibrate."""
    stats = reusable_statistics(loaded, work, calib, dtype)
    return stats if stats is not None else run_calibrate(loaded, work, calib, batch_size, device, dtype)


def run_smooth(loaded, work, calib, smoothing, batch_size, device, dtype) -> dict:
    stats = ensure_statistics(loaded, work, calib, batch_size, device, dtype)
    settings = {**asdict(calib), "dtype": dtype, **smoothing.record()}
    if smoothing.auto:
        from lite.search import search_alphas

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


def ensure_scales(loaded, work, calib, smoothing, batch_size, device, dtype) -> dict:
    settings = {**asdict(calib), "dtype": dtype, **smoothing.record()}
    if work.matches("migration_scales", settings, (SCALES,)):
        scales = _load_tensors(work.file(SCALES))
        validate_scales(scales, loaded, work.file(SCALES))
        return scales
    return run_smooth(loaded, work, calib, smoothing, batch_size, device, dtype)


def readback_batches(tokenizer, tokens: torch.Tensor | None) -> list[torch.Tensor]:
    """Two batches of one window (at most 128 tokens) for the read-back check: calibration windows
    when there are any, else windows of the text shipped with lite."""
    if tokens is None:
        tokens = calibration_tokens(tokenizer, "sample", 2, 128, 0)
    return [window[None, :128] for window in tokens[:2]]


def check_out_dir(work: WorkDir, out_dir: str | None) -> str:
    """The absolute output folder (default WORK_DIR/quantized); refuses one lite did not write."""
    out_dir = os.path.abspath(out_dir or work.file("quantized"))
    if os.path.isdir(out_dir) and os.listdir(out_dir) and work.settings_of("export") is None:
        raise LiteError(f"output folder {out_dir} exists and was not written by lite for this work dir; "
                        "pass another --out-dir")
    return out_dir


def check_quant_dtype(quant_dtype: str) -> None:
    if quant_dtype not in QUANT_DTYPES:
        raise LiteError(f"--quant-dtype {quant_dtype!r} is not one of: {', '.join(QUANT_DTYPES)}")


def run_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size, out_dir,
               fmt="lmdeploy", act=ActSettings(), calib=None, batch_size=4, device="cpu") -> str:
    """Quantize and write in `fmt`, then read the folder back and compare logits.

    `calib` (the calibration settings) gives the windows for static activation scales and the
    read-back check; it is required for static scales.
    """
    check_quant_dtype(quant_dtype)
    check_export_options(fmt, act, export_migration_scale)
    out_dir = check_out_dir(work, out_dir)
    tokens = None
    if calib is not None:
        tokens = calibration_tokens(loaded.tokenizer, calib.calib_dataset, calib.calib_samples,
                                    calib.calib_seqlen, calib.seed, loaded.config.vocab_size)
    elif act.static:
        raise LiteError("--act-scheme static needs calibration windows; run `lite calibrate` on this work dir "
                        "first (its settings are reused) or use `lite smooth_quant`")
    quantize_and_write(loaded, fmt, quant_dtype, scales, export_migration_scale, act, tokens, batch_size, device,
                       out_dir, max_shard_size)
    check_readback(loaded.model, out_dir, readback_batches(loaded.tokenizer, tokens))
    work.record("export", {"out_dir": out_dir, "quant_dtype": quant_dtype, "format": fmt, **asdict(act),
                           "export_migration_scale": export_migration_scale, "smoothed": bool(scales)})
    print(f"wrote {out_dir}")
    return out_dir


def open_model(model: str, work_dir: str, dtype: str, trust_remote_code: bool) -> tuple[LoadedModel, WorkDir]:
    if work_dir is None:
        raise LiteError("--work-dir is required: the folder where statistics, scales and the checkpoint go")
    loaded = load_model(model, dtype, trust_remote_code)
    return loaded, WorkDir(work_dir, loaded)


def open_streamed(model: str, work_dir: str, dtype: str, trust_remote_code: bool):
    """(StreamedModel, WorkDir) when MODEL is a local safetensors folder whose skeleton streams, else None."""
    from lite import stream

    if work_dir is None or not stream.is_streamable(model):
        return None
    streamed = stream.open_streamed(model, dtype, trust_remote_code)
    if streamed is None:
        return None
    return streamed, WorkDir(work_dir, None, stream.identity(streamed))


def calibrate(model, work_dir, calib: CalibSettings, batch_size=4, device=None, dtype="auto",
              trust_remote_code=False) -> None:
    from lite import stream

    device = device or default_device()
    streamed = open_streamed(model, work_dir, dtype, trust_remote_code)
    if streamed is not None:
        sm, work = streamed
        stream.stream_calibrate(sm, work, calib, batch_size, device, dtype)
    else:
        loaded, work = open_model(model, work_dir, dtype, trust_remote_code)
        run_calibrate(loaded, work, calib, batch_size, device, dtype)
    print(f"wrote {work.file(INPUTS_STATS)} and {work.file(OUTPUTS_STATS)}")


def smooth(model, work_dir, calib: CalibSettings, smoothing: SmoothSettings, batch_size=4, device=None,
           dtype="auto", trust_remote_code=False) -> None:
    from lite import stream

    device = device or default_device()
    # The alpha search runs the whole model; fixed alphas read one block's weights at a time.
    streamed = None if smoothing.auto else open_streamed(model, work_dir, dtype, trust_remote_code)
    if streamed is not None:
        sm, work = streamed
        stream.stream_smooth(sm, work, calib, smoothing, batch_size, device, dtype)
    else:
        loaded, work = open_model(model, work_dir, dtype, trust_remote_code)
        run_smooth(loaded, work, calib, smoothing, batch_size, device, dtype)
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
    from lite import stream

    check_export_options(fmt, act, export_migration_scale)
    device = device or default_device()
    # lmdeploy with dynamic activations needs no forward pass: stream the blocks shard in, shard out.
    streamed = open_streamed(model, work_dir, dtype, trust_remote_code) if fmt == "lmdeploy" and not act.static \
        else None
    if streamed is not None:
        loaded, work = streamed
    else:
        loaded, work = open_model(model, work_dir, dtype, trust_remote_code)
    scales = None
    if os.path.isfile(work.file(SCALES)) and not no_smooth:
        scales = _load_tensors(work.file(SCALES))
        validate_scales(scales, loaded, work.file(SCALES))
        searched_for = (work.settings_of("migration_scales") or {}).get("quant_dtype")
        if searched_for not in (None, quant_dtype):
            print(f"note: {SCALES} was searched (--alpha auto) for {searched_for}, not {quant_dtype}; "
                  f"run `lite smooth --alpha auto --quant-dtype {quant_dtype}` first for the best {quant_dtype} result")
    elif export_migration_scale:
        print(f"no {SCALES} in {work.path} (or --no-smooth): every migration_scale will be ones")
    if streamed is not None:
        return stream.stream_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size,
                                    out_dir, device)
    return run_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size, out_dir,
                      fmt, act, recorded_calib(work) if act.static else None, batch_size, device)


def smooth_quant(model, work_dir, calib: CalibSettings, smoothing: SmoothSettings, quant_dtype="int8",
                 export_migration_scale=False, max_shard_size="5GB", out_dir=None, batch_size=4, device=None,
                 dtype="auto", trust_remote_code=False, fmt="lmdeploy", act=ActSettings(), no_smooth=False,
                 max_gpu_memory="8GiB") -> str:
    check_quant_dtype(quant_dtype)  # before calibrating, not after
    check_export_options(fmt, act, export_migration_scale)
    device = device or default_device()
    if fmt == "lmdeploy" and not act.static and not no_smooth and not smoothing.auto:
        # A local safetensors folder and nothing to reuse in the work dir: one streamed pass over the blocks.
        from lite import stream

        if work_dir is not None and stream.is_streamable(model):
            streamed = stream.open_streamed(model, dtype, trust_remote_code)
            if streamed is not None:
                work = WorkDir(work_dir, None, stream.identity(streamed))
                if not any(os.path.exists(work.file(f)) for f in (INPUTS_STATS, SCALES)):
                    return stream.stream_smooth_quant(streamed, work, calib, smoothing, quant_dtype,
                                                      export_migration_scale, max_shard_size, out_dir, batch_size,
                                                      device, dtype, max_gpu_memory)
    if batch_size == "auto":
        batch_size = 4
    loaded, work = open_model(model, work_dir, dtype, trust_remote_code)
    scales = None if no_smooth else ensure_scales(loaded, work, calib, smoothing, batch_size, device, dtype)
    return run_export(loaded, work, scales, quant_dtype, export_migration_scale, max_shard_size, out_dir,
                      fmt, act, calib, batch_size, device)
