"""Quantization records: what every quantizing step produces for each linear it quantizes, and all that a
checkpoint format needs to store it. Steps (`rtn`, `gptq`) leave `{linear name: QuantizedWeight}` on
`Block.records`; the format's `realize_` turns them into the modules its engines compute with, which
the writer then stores under the format's names (`lite/formats.py`). No format quantizes, and no step
knows a format.

`block_w8a8_records` is the W8A8 round-to-nearest of one block, shared by the `rtn` step and the
loaded exports.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from lite.archs import quantized_linears
from lite.quant import quantize_per_channel, row_chunks
from lite.smooth import check_finite, fold_scales_


@dataclass
class QuantizedWeight:
    """One quantized linear.

    W8A8 (`weight_only` False): `codes` int8 or float8_e4m3fn `(out, in)`, `scale` fp32 `(out, 1)`, and
    how the engine quantizes the input: per token at run time, or with the static per-tensor
    `input_scale` fp32 `(1,)`; `migration_scale` fp32 `(in,)` when SmoothQuant's factors are kept apart
    for the engine to apply (lmdeploy's extension) rather than folded.

    Weight-only: `codes` integers on `lite.quant`'s grid `(out, in)` (signed int8 when symmetric; uint8
    with `zero` int32 `(out, groups)` otherwise: a byte per code while a block's records wait for the
    writer, `compact_codes`), `scale` fp32 `(out, groups)` holding values the
    format's scale dtype represents exactly, `bits`, and `group_size` input columns per scale (-1: one
    per output channel); the group map is `column // group_size` (lite writes no act-order map).

    `dtype` is the model dtype (the bias's, and compressed-tensors' scales'); `bias` is the linear's."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    weight_only: bool = False
    bits: int = 8
    group_size: int = -1
    zero: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    migration_scale: torch.Tensor | None = None


def compact_codes(codes: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Weight-only codes of at most 8 bits in one byte each: int8 when signed (symmetric), else uint8."""
    return codes.to(torch.int8 if symmetric else torch.uint8)


@torch.no_grad()
def w8a8_record(linear: nn.Linear, qdtype: torch.dtype, migration_scale: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest per output channel (`absmax / qmax`) of a float linear; with `migration_scale` its
    columns are multiplied by it first (and the record keeps it, for the engine to divide the input by)."""
    w_all = linear.weight
    codes = torch.empty(w_all.shape, dtype=qdtype, device=w_all.device)
    scale = torch.empty((w_all.shape[0], 1), dtype=torch.float32, device=w_all.device)
    ms = None if migration_scale is None else migration_scale.float()
    # Rows quantize independently: a chunk at a time keeps the fp32 copies of large weights small.
    for rows in row_chunks(*w_all.shape):
        w = w_all[rows].float()  # (rows, in)
        if ms is not None:
            w = w * ms  # (rows, in) · (in,)
        codes[rows], scale[rows] = quantize_per_channel(w, qdtype)
    return QuantizedWeight(codes, scale, w_all.dtype, bias=None if linear.bias is None else linear.bias.detach(),
                           input_scale=None if input_scale is None else input_scale.reshape(1).float(),
                           migration_scale=ms)


@torch.no_grad()
def block_w8a8_records(block: nn.Module, prefix: str, arch, config, qdtype: torch.dtype,
                       scales: dict[str, torch.Tensor], export_migration_scale: bool = False,
                       input_scales: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedWeight]:
    """`{linear name: record}` of one block's quantized linears, after checking every weight is finite.

    SmoothQuant factors `scales` are folded into the norms and producers first (the block changes in
    place), or, with `export_migration_scale`, kept on every record (ones where a linear is not
    smoothed). `input_scales` `{linear fqn: (1,)}`: static activation scales."""
    arch = arch.at(prefix)
    for name, p in block.named_parameters():
        check_finite(f"{prefix}.{name}", p.detach(), "weight")
    if not export_migration_scale:
        fold_scales_(block, prefix, arch, config, scales)
    records = {}
    for name in quantized_linears(arch, block):
        linear, fqn = block.get_submodule(name), f"{prefix}.{name}"
        ms = None
        if export_migration_scale:
            ms = scales.get(fqn, torch.ones(linear.in_features, device=linear.weight.device))
        records[name] = w8a8_record(linear, qdtype, ms, (input_scales or {}).get(fqn))
    return records
