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
    """No NaN or Inf in `t`. fp32 sums decide in the common case (a NaN or Inf anywhere makes one
    non-finite); only when one is not finite, which a finite tensor of huge values can also cause, is
    every element checked. The sums go `CHUNK_ELEMENTS` at a time: a bf16 tensor summed in fp32 at once
    is first copied whole to fp32 (twice the embeddings' size, the peak of a CPU run: issue 9)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    sums = torch.stack([flat[i:i + CHUNK_ELEMENTS].sum(dtype=torch.float32)
                        for i in range(0, flat.numel(), CHUNK_ELEMENTS)])
    return bool(torch.isfinite(sums).all()) or bool(torch.isfinite(t).all())


# ---------------------------------------------------------------------------- weight-only int2..int8 (issue 10)

def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes of a `bits`-bit grid: symmetric `[-2^(b-1), 2^(b-1) - 1]`, asymmetric `[0, 2^b - 1]`."""
    assert 2 <= bits <= 8, f"bits must lie in 2..8, got {bits}"
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(out, in)` -> `(out, groups, group_size)`; `group_size` -1 means one group per row."""
    out, inp = w.shape
    g = inp if group_size == -1 else group_size
    assert inp % g == 0, f"in_features {inp} is not a multiple of group_size {g}"
    return w.reshape(out, inp // g, g)


def weight_qparams(w: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = True,
                   clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale `(out, groups)` fp32, zero `(out, groups)` int32 or None) of a weight `(out, in)`.

    Symmetric: `scale = c · absmax / qmax` (qmax = 2^(b-1) - 1, as lite's int8), codes clamped to
    `int_range`. Asymmetric: the group's range, widened to hold 0, `c` times, over `2^b - 1` steps;
    `zero = round(-min / scale)`, so that 0 is exact. `clip` (c, a number or `(out, groups)`) narrows
    the range (`mse_clip` chooses it); 1 keeps every value inside the grid.
    """
    x = _grouped(w.float(), group_size)  # (out, groups, g)
    low, high = int_range(bits, symmetric)
    if symmetric:
        absmax = x.abs().amax(dim=-1) * clip  # (out, groups)
        return torch.where(absmax > 0, absmax / high, torch.ones_like(absmax)), None
    lo = x.amin(dim=-1).clamp(max=0) * clip
    hi = x.amax(dim=-1).clamp(min=0) * clip
    scale = (hi - lo) / (high - low)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(low, high).to(torch.int32)
    return scale, zero


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                    group_size: int = -1) -> torch.Tensor:
    """Integer codes `(out, in)` int32 of `w` on the grid `(scale, zero)` (`zero` None: symmetric)."""
    x = _grouped(w.float(), group_size)  # (out, groups, g)
    low, high = int_range(bits, zero is None)
    q = torch.round(x / scale[..., None])
    if zero is not None:
        q = q + zero[..., None]
    return q.clamp_(low, high).to(torch.int32).reshape(w.shape)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int = -1) -> torch.Tensor:
    """fp32 `(out, in)` from codes: `(q - zero) · scale` per group."""
    x = _grouped(q.float(), group_size)  # (out, groups, g)
    if zero is not None:
        x = x - zero[..., None]
    return (x * scale[..., None]).reshape(q.shape)


MSE_CLIPS = torch.linspace(0.5, 1.0, 51)  # the clip ratios c that `mse_clip` tries, 1.0 included


def mse_clip(w: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = True,
             clips: torch.Tensor = MSE_CLIPS, hessian: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`weight_qparams` with each group's clip ratio c (from `clips`) chosen to minimize that group's
    error, never worse than c = 1 when 1 is among `clips`. The error of a group's weight error d `(g,)`:

    - plain: Σ d²;
    - `hessian` `(groups, g, g)`, the diagonal blocks of E[x xᵀ]: dᵀ H_gg d, the mean squared error the
      group adds to the linear's output over the calibration tokens (per channel: exactly its output error).

    Each candidate's grid is computed as `weight_qparams(w, ..., clip=c)` computes it, from the group
    ranges found once; the quantize-dequantize error goes through one reused buffer. (`lite.kernels.mse_clip`
    runs the same search as one Triton kernel where it can.)
    """
    x = _grouped(w.float(), group_size)  # (out, groups, g)
    low, high = int_range(bits, symmetric)
    if symmetric:
        absmax = x.abs().amax(dim=-1)  # (out, groups)
    else:
        lo0, hi0 = x.amin(dim=-1).clamp(max=0), x.amax(dim=-1).clamp(min=0)
    d = torch.empty_like(x)
    best_err, best_scale, best_zero = None, None, None
    for c in clips.tolist():
        if symmetric:
            a = absmax * c
            scale, zero = torch.where(a > 0, a / high, torch.ones_like(a)), None
        else:
            lo, hi = lo0 * c, hi0 * c
            scale = (hi - lo) / (high - low)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.round(-lo / scale).clamp(low, high)
        torch.div(x, scale[..., None], out=d).round_()
        if zero is not None:
            d.add_(zero[..., None])
        d.clamp_(low, high)
        if zero is not None:
            d.sub_(zero[..., None])
        d.mul_(scale[..., None]).sub_(x)  # dequantized − original, (out, groups, g)
        if hessian is not None:
            dg = d.transpose(0, 1)  # (groups, out, g)
            err = (torch.bmm(dg, hessian) * dg).sum(dim=-1).T  # (out, groups): dᵀ H_gg d
        else:
            err = d.square_().sum(dim=-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = None if zero is None else torch.where(better, zero, best_zero)
    return best_scale, None if best_zero is None else best_zero.to(torch.int32)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes `(..., n)` in `[0, 2^bits)` packed densely little-endian along the last dimension
    into int32 words `(..., ceil(n·bits / 32))`: element i holds bits [i·b, i·b + b) of the word stream
    (for int4, element 0 is the lowest nibble of word 0). Runs on the codes' device."""
    assert int(q.min()) >= 0 and int(q.max()) < (1 << bits), f"codes must lie in [0, 2^{bits})"
    *lead, n = q.shape
    words = -(-n * bits // 32)
    if q.dim() >= 2 and q.numel() > CHUNK_ELEMENTS:
        # Rows pack independently: a chunk at a time keeps the int64 temporaries (8 bytes per code) small.
        flat = q.reshape(-1, n)
        out = torch.empty((flat.shape[0], words), dtype=torch.int32, device=q.device)
        for rows in row_chunks(*flat.shape):
            out[rows] = pack_int32(flat[rows], bits)
        return out.reshape(*lead, words)
    if 32 % bits == 0:  # 2, 4, 8 bits: whole codes per word, one shift and add per position in the word
        per = 32 // bits
        padded = torch.nn.functional.pad(q.to(torch.int64), (0, words * per - n)).reshape(*lead, words, per)
        packed = torch.zeros((*lead, words), dtype=torch.int64, device=q.device)
        for j in range(per):
            packed |= padded[..., j] << (bits * j)
    else:  # 3, 5, 6, 7 bits: codes straddle words; go through the bit stream
        shifts = torch.arange(bits, device=q.device)
        stream = ((q.to(torch.int64)[..., None] >> shifts) & 1).reshape(*lead, n * bits)  # (..., n·b) bits
        stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits)).reshape(*lead, words, 32)
        packed = (stream << torch.arange(32, device=q.device)).sum(dim=-1)  # (..., words) in [0, 2^32)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_int32`: `(..., words)` int32 -> codes `(..., n)` int32."""
    *lead, words = packed.shape
    unsigned = packed.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, device=packed.device) * bits
        codes = (unsigned[..., None] >> shifts) & ((1 << bits) - 1)  # (..., words, per)
        return codes.reshape(*lead, words * per)[..., :n].to(torch.int32)
    stream = (unsigned[..., None] >> torch.arange(32, device=packed.device)) & 1  # (..., words, 32)
    stream = stream.reshape(*lead, words * 32)[..., : n * bits].reshape(*lead, n, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=-1).to(torch.int32)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble j of a word holds column AWQ_ORDER[j] of its 8


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes `(rows, cols)` (cols a multiple of 8) -> int32 `(rows, cols / 8)` in AutoAWQ's GEMM order."""
    rows, cols = q.shape
    assert cols % 8 == 0, f"AWQ packs 8 columns per word; {cols} columns"
    grouped = q.reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]  # (rows, words, 8), nibble order
    return pack_int32(grouped, 4).reshape(rows, cols // 8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    rows, words = packed.shape
    nibbles = unpack_int32(packed[..., None], 4, 8)  # (rows, words, 8) in nibble order
    inverse = [AWQ_ORDER.index(j) for j in range(8)]
    return nibbles[..., inverse].reshape(rows, words * 8)


def pack_gptq(q: torch.Tensor, zero: torch.Tensor, bits: int, checkpoint_format: str = "gptq"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's (`qweight` `(in·b/32, out)`, `qzeros` `(groups, out·b/32)`) from unsigned codes `(out, in)` and
    zero points `(out, groups)`: codes packed along the input dimension, zeros along the output one;
    `checkpoint_format` "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself."""
    assert checkpoint_format in ("gptq", "gptq_v2"), f"unknown GPTQ checkpoint format {checkpoint_format!r}"
    stored = zero - 1 if checkpoint_format == "gptq" else zero
    stored = stored & ((1 << bits) - 1)  # v1 stores a zero of 0 as -1: all ones in `bits` bits
    return pack_int32(q, bits).T.contiguous(), pack_int32(stored.T.contiguous(), bits)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, in_features: int, out_features: int,
                checkpoint_format: str = "gptq") -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_gptq`: (codes `(out, in)`, zero points `(out, groups)`)."""
    q = unpack_int32(qweight.T.contiguous(), bits, in_features)
    stored = unpack_int32(qzeros, bits, out_features).T.contiguous()  # (out, groups)
    zero = (stored + 1) & ((1 << bits) - 1) if checkpoint_format == "gptq" else stored
    return q, zero
