"""Settings of the stages, as dataclasses checked when made, and the records the work dir keeps of them.

A record holds everything an artifact depends on; `WorkDir.reusable` compares records, so the keys
here are the manifest's vocabulary.
"""

import os
from dataclasses import asdict, dataclass

from lite.data import check_dataset, data_fingerprint
from lite.errors import LiteError
from lite.observers import ActSettings
from lite.quant import QUANT_DTYPES
from lite.smooth import W_STATS


@dataclass(frozen=True)
class CalibSettings:
    calib_dataset: str = "wikitext2"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    # MoE: every expert's observers see every calibration token (`lite.moe`); the output keeps real routing.
    moe_calibrate_all_experts: bool = True

    def __post_init__(self):
        check_dataset(self.calib_dataset)
        if not isinstance(self.moe_calibrate_all_experts, bool):
            raise LiteError(f"--moe-calibrate-all-experts takes true or false, got {self.moe_calibrate_all_experts!r}")
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


def check_quant_dtype(quant_dtype: str) -> None:
    if quant_dtype not in QUANT_DTYPES:
        raise LiteError(f"--quant-dtype {quant_dtype!r} is not one of: {', '.join(QUANT_DTYPES)}")


def check_batch_size(batch_size) -> None:
    if batch_size != "auto" and not (isinstance(batch_size, int) and not isinstance(batch_size, bool)
                                     and batch_size >= 1):
        raise LiteError(f"--batch-size must be a positive integer or auto, got {batch_size!r}")


def describe_calib(calib: CalibSettings) -> str:
    return (f"{calib.calib_samples} x {calib.calib_seqlen} tokens of {os.path.basename(str(calib.calib_dataset))}"
            f", seed {calib.seed}")


def calib_record(calib: CalibSettings, dtype: str) -> dict:
    """What statistics depend on: the calibration settings, the text's content hash and the dtype. The MoE
    setting is recorded only when it is off: on is what every record made before it existed means."""
    record = asdict(calib)
    if record["moe_calibrate_all_experts"]:
        del record["moe_calibrate_all_experts"]
    return {**record, "calib_data_sha256": data_fingerprint(calib.calib_dataset), "dtype": dtype}


def smoothing_record(calib, smoothing, dtype) -> dict:
    return {**calib_record(calib, dtype), **smoothing.record()}


def export_settings(work, fmt: str, quant_dtype: str, act: ActSettings, export_migration_scale: bool,
                    max_shard_size, dtype: str, smoothed: bool, calib: CalibSettings | None) -> dict:
    """Every setting that determines a checkpoint, for the manifest's `export` record and the folder's marker."""
    return {"format": fmt, "quant_dtype": quant_dtype, **asdict(act), "export_migration_scale": export_migration_scale,
            "max_shard_size": max_shard_size, "dtype": dtype, "smoothed": smoothed,
            "migration_scales": work.settings_of("migration_scales") if smoothed else None,
            "calibration": calib_record(calib, dtype) if calib is not None and act.static else None}


