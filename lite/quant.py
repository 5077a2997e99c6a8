"""Pure tensor math for quantization: tensors in, tensors out; no modules, no I/O, no device moves.

Symmetric scales follow lmdeploy: `scale = absmax / qmax` with qmax 127 for int8 and 448 for fp8
e4m3, values clamped to the type's range. An all-zero row or token gets scale 1 (it dequantizes to 0).
"""

import torch

QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# Large weights are handled this many elements at a time (16 MiB in fp32), so that their fp32 copies
# stay small (a 70B model's gate_proj alone is 0.9 GB in fp32) while each kernel still has plenty to do.
CHUNK_ELEMENTS = 1 << 22
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quant_dtype_of(name: str) -> torch.dtype:
    if name not in QUANT_DTYPES:
        raise ValueError(f"quant dtype {name!r} is not one of {sorted(QUANT_DTYPES)}")
    return QUANT_DTYPES[name]


def symmetric_scale(absmax: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """fp32 scale from an absmax; zero absmax gives 1 so that 0 stays 0 and nothing divides by 0."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / QMAX[qdtype], torch.ones_like(absmax))


def quantize(x: torch.Tensor, scale: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """Round x / scale to `qdtype` (scale broadcasts against x)."""
    y = x.float() / scale
    if qdtype == torch.int8:
        return y.round_().clamp_(-128, 127).to(torch.int8)
    return y.clamp_(-QMAX[qdtype], QMAX[qdtype]).to(qdtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def quantize_per_channel(w: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights `(out, in)` -> (q `(out, in)`, fp32 scale `(out, 1)`), one scale per output row."""
    scale = symmetric_scale(w.abs().amax(dim=1, keepdim=True), qdtype)  # (out, 1)
    return quantize(w, scale, qdtype), scale


def quantize_per_token(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations `(..., channels)` -> (q, fp32 scale `(..., 1)`), one scale per token."""
    scale = symmetric_scale(x.abs().amax(dim=-1, keepdim=True), qdtype)  # (..., 1)
    return quantize(x, scale, qdtype), scale


def fake_quantize_per_token(x: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """x rounded to the per-token grid, in fp32."""
    q, scale = quantize_per_token(x, qdtype)
    return dequantize(q, scale)


def row_chunks(rows: int, in_features: int, start: int = 0) -> list[slice]:
    """Slices covering rows [start, start + rows) of a `(rows, in_features)` weight, about
    `CHUNK_ELEMENTS` elements each: for row-wise work whose fp32 temporaries must stay small."""
    step = max(1, CHUNK_ELEMENTS // max(1, in_features))
    return [slice(i, min(i + step, start + rows)) for i in range(start, start + rows, step)]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. One fp32 sum decides in the common case (a NaN or Inf anywhere makes it
    non-finite); only when it is not finite, which a finite tensor of huge values can also cause, is
    every element checked."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())
