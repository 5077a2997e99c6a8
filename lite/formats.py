"""Checkpoint formats by name, each one `Format` record: which options it takes, how quantization
records (`lite.records`) become the modules its engines compute with, the writer the sweep hands
finished blocks to, how its reader builds the model (whole, or as a skeleton read one block at a
time), and the read-back check of a loaded export (a streamed export's is `lite.steps.readback`).

- `lmdeploy`: lmdeploy's `smooth_quant` layout (QRMSNorm + QLinear, per-token activations), with the
  optional migration-scale extension. Read by lmdeploy's PyTorch engine.
- `compressed-tensors`: `int-quantized` / `float-quantized`, per-token dynamic or per-tensor static
  activations, smoothing folded into the norms. Read by vLLM, SGLang and transformers.

The weight-only layouts (pack-quantized, AutoAWQ GEMM, GPTQ) live in `lite.weight_only` (`realizer`,
`streaming_writer`, `reader_structure`); `block_reader` finds the reader of any folder lite writes.
"""

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from lite import compressed_tensors, export, weight_only
from lite.archs import to_checkpoint
from lite.export import quant_method_of
from lite.errors import LiteError
from lite.folders import replace_folder
from lite.observers import ActSettings


@dataclass(frozen=True)
class Format:
    """One W8A8 checkpoint layout.

    `check(act, export_migration_scale)` refuses what the layout cannot store; `realize_(block, prefix,
    arch, records)` turns a block's quantization records (`lite.records`, what the quantizing steps
    produce) into the modules the engine computes with, which the writers store under the format's
    names; `writer(folder, model, dtype, ...)` is the checkpoint writer the sweep hands finished blocks to
    (`model` a `LoadedModel` or a `StreamedModel`); `structure(folder, device)` is the reader's model
    before any tensor (on "meta": a skeleton to read block by block), `(model, quantization_config, dtype)`;
    `stored_names(model, arch)` is `(rename, transform)`: the stored name of each state-dict entry and how
    a stored tensor becomes it (None: the model's own names and tensors); `read(folder)` is the whole
    model, ready to compute."""

    name: str
    quant_method: str
    check: Callable
    realize_: Callable
    writer: Callable
    structure: Callable
    stored_names: Callable
    read: Callable


def _check_lmdeploy(act: ActSettings, export_migration_scale: bool) -> None:
    if act.static:
        raise LiteError("--act-scheme static needs --format compressed-tensors (lmdeploy's smooth_quant "
                        "layout has per-token activations only)")


def _check_compressed_tensors(act: ActSettings, export_migration_scale: bool) -> None:
    if export_migration_scale:
        raise LiteError("--export-migration-scale is an lmdeploy-format feature; drop it or use --format lmdeploy")


def _lmdeploy_writer(folder, sm, dtype, quant_dtype, export_migration_scale, max_shard_size, marker, act):
    return export.streaming_writer(folder, sm.model, quant_dtype, export_migration_scale, max_shard_size, dtype,
                                   sm.tokenizer, sm.folder, marker)


def _compressed_tensors_writer(folder, sm, dtype, quant_dtype, export_migration_scale, max_shard_size, marker, act):
    return compressed_tensors.streaming_writer(folder, sm.model, quant_dtype, max_shard_size, dtype, sm.tokenizer,
                                               sm.folder, marker, act)


def _compressed_tensors_names(model: nn.Module, arch):
    quantized = {name for name, m in model.named_modules() if isinstance(m, compressed_tensors.QLinear)}

    def rename(name):
        return to_checkpoint(arch, compressed_tensors.ct_name(name, quantized))

    def transform(name, t):
        return compressed_tensors.reader_tensor(model, quantized, name, t)

    return rename, transform


LMDEPLOY = Format("lmdeploy", export.QUANT_METHOD, _check_lmdeploy, export.realize_, _lmdeploy_writer,
                  export.reader_structure, lambda model, arch: (None, None), export.load_quantized)
COMPRESSED_TENSORS = Format("compressed-tensors", compressed_tensors.QUANT_METHOD, _check_compressed_tensors,
                            compressed_tensors.realize_, _compressed_tensors_writer,
                            compressed_tensors.reader_structure, _compressed_tensors_names,
                            compressed_tensors.load_compressed_tensors)
# --format name -> its Format
FORMATS = {f.name: f for f in (LMDEPLOY, COMPRESSED_TENSORS)}
# quant_method in config.json -> the reader that builds a model computing what the engine computes
READERS = {**{f.quant_method: f.read for f in FORMATS.values()},
           "awq": weight_only.load_weight_only, "gptq": weight_only.load_weight_only}
# Largest |logit| difference, relative to the largest |logit|, between the in-memory quantized model
# and the checkpoint read back. Both compute the same thing from the same tensors, so anything beyond
# fp32 reordering noise means the folder does not hold what was computed.
READBACK_TOLERANCE = 1e-4


def format_of(folder: str) -> Format | None:
    """The W8A8 format a folder's config.json names, or None."""
    method = quant_method_of(folder)
    return next((f for f in FORMATS.values() if f.quant_method == method), None)


def check_export_options(fmt: str, act: ActSettings, export_migration_scale: bool) -> None:
    """Refuse combinations a format cannot store, naming the fix."""
    if fmt not in FORMATS:
        raise LiteError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    FORMATS[fmt].check(act, export_migration_scale)


def is_weight_only(folder: str) -> bool:
    """Whether a folder's config.json names a weight-only checkpoint (awq, gptq, pack-quantized)."""
    method = quant_method_of(folder)
    return method in weight_only.METHODS and (method != compressed_tensors.QUANT_METHOD or _pack_quantized(folder))


def block_reader(folder: str) -> tuple:
    """`(structure, stored_names)` of the format a folder's config.json names (a `Format`'s, or the
    weight-only formats', whose folders store the WQLinears' buffers under the model's names): what the
    block-by-block read-back builds its skeleton and reads its tensors with."""
    if is_weight_only(folder):
        return weight_only.reader_structure, lambda model, arch: (None, None)
    fmt = format_of(folder)
    if fmt is None:
        raise LiteError(f"{folder}: no block-by-block reader for quant_method {quant_method_of(folder)!r}")
    return fmt.structure, fmt.stored_names


def load_checkpoint(folder: str) -> nn.Module:
    """Read a folder lite wrote, in whichever format, into a model of QLinears (W8A8) or WQLinears
    (weight-only)."""
    method = quant_method_of(folder)
    if is_weight_only(folder):
        return weight_only.load_weight_only(folder)
    if method not in READERS:
        raise LiteError(f"{folder} is not a checkpoint lite reads (quant_method {method!r}; "
                        f"readable: {', '.join(READERS)})")
    return READERS[method](folder)


def _pack_quantized(folder: str) -> bool:
    with open(os.path.join(str(folder), "config.json")) as f:
        return json.load(f)["quantization_config"].get("format") == "pack-quantized"


def describe(qc: dict | None) -> str:
    """A short label of a model's quantization for tables: `none`, `smooth_quant int8`, `ct int8 static`,
    `w4 g128 sym (gptq)`."""
    if not qc:
        return "none"
    if weight_only.scheme_of(qc) is not None:
        return weight_only.describe(qc)
    if qc.get("quant_method") == compressed_tensors.QUANT_METHOD:
        return compressed_tensors.describe(qc)
    if qc.get("quant_method") == export.QUANT_METHOD:
        dtype = "fp8" if "float8" in str(qc.get("quant_dtype")) else "int8"
        return f"smooth_quant {dtype}" + (" migration" if qc.get("migration_scale") else "")
    return str(qc.get("quant_method"))


@torch.no_grad()
def readback_difference(model: nn.Module, folder: str, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) between `model` and `folder` read back, over `batches`."""
    reread = load_checkpoint(folder)
    diff, peak = 0.0, 0.0
    for ids in batches:
        a = model(input_ids=ids, use_cache=False).logits.float()
        b = reread(input_ids=ids, use_cache=False).logits.float()
        diff = max(diff, (a - b).abs().max().item())
        peak = max(peak, a.abs().max().item())
    return diff, peak


def check_readback(model: nn.Module, folder: str, batches: list[torch.Tensor]) -> float:
    """Read the written folder back, compare logits with the in-memory model, print the difference and
    raise when it exceeds `READBACK_TOLERANCE` (relative to the largest logit)."""
    diff, peak = readback_difference(model, folder, batches)
    print(f"read-back check: max |logit difference| {diff:.3g} (max |logit| {peak:.3g}) over {len(batches)} batches")
    if not diff <= READBACK_TOLERANCE * max(peak, 1.0):
        # Move the folder aside so that nothing serves a checkpoint that does not compute what was quantized.
        aside = f"{os.path.abspath(folder)}.unverified"
        replace_folder(folder, aside)
        raise LiteError(f"{folder} read back gives logits {diff:.3g} away from the in-memory quantized model "
                        f"(tolerance {READBACK_TOLERANCE * max(peak, 1.0):.3g}); moved it to {aside}; "
                        "this is a bug in lite, please report it")
    return diff
