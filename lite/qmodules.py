"""Modules that live in an exported model: `QLinear` (W8A8) and `QRMSNorm`.

Their forward is a plain-PyTorch reference of what an engine computes: weights int8 (or fp8 e4m3)
with one scale per output channel, activations quantized per token at run time (or, with a static
`input_scale`, with one calibrated scale per tensor). The integer GEMM is emulated in fp32, which
equals an int32 accumulation while partial sums stay below 2^24; on CUDA, int8 runs `torch._int_mm`
where its shape rules allow.
"""

import torch
import torch.nn as nn

from lite.quant import dequantize, fake_quantize_per_token, quantize, quantize_per_token
from lite.records import w8a8_record


def integer_matmul(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """xq `(..., in)` @ w `(out, in)`^T for int8 or fp8 codes, as fp32 `(..., out)` before any scaling.

    torch._int_mm (int8 x int8 -> exact int32 on CUDA) needs more than 16 rows and `in`, `out`
    multiples of 8. Every other case (CPU, fp8, small or odd shapes) takes the reference path: an fp32
    matmul of the integer values, exact while partial sums stay below 2^24 and within fp32 rounding
    beyond that.
    """
    x2 = xq.reshape(-1, xq.shape[-1])  # (tokens, in)
    if (x2.is_cuda and x2.dtype == torch.int8 and x2.shape[0] > 16
            and x2.shape[1] % 8 == 0 and w.shape[0] % 8 == 0):
        y = torch._int_mm(x2, w.T).float()  # (tokens, out) int32 -> fp32
    else:
        y = x2.float() @ w.float().T  # (tokens, out)
    return y.reshape(*xq.shape[:-1], w.shape[0])


class QLinear(nn.Module):
    """y = dequant(quant_token(x / migration_scale) @ quant_channel(W · diag(migration_scale))^T) + b.

    With `input_scale` (fp32 `(1,)`, a static per-tensor scale calibrated at export) the input is
    quantized with that scale instead of one computed per token.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, qdtype: torch.dtype,
                 dtype: torch.dtype, migration_scale: bool = False, device=None, input_scale: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.qdtype = in_features, out_features, qdtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=qdtype, device=device))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer(
            "migration_scale",
            torch.ones(in_features, dtype=torch.float32, device=device) if migration_scale else None,
        )
        self.register_buffer(
            "input_scale", torch.ones(1, dtype=torch.float32, device=device) if input_scale else None)

    @classmethod
    @torch.no_grad()
    def from_record(cls, record):
        """The QLinear storing a W8A8 `lite.records.QuantizedWeight`: its codes, scales, bias and, when the
        record has them, the migration scale and the static input scale."""
        out_features, in_features = record.codes.shape
        q = cls(in_features, out_features, record.bias is not None, record.codes.dtype, record.dtype,
                record.migration_scale is not None, device=record.codes.device,
                input_scale=record.input_scale is not None)
        q.weight.copy_(record.codes)
        q.scale.copy_(record.scale.reshape(out_features, 1))
        if record.bias is not None:
            q.bias.copy_(record.bias)
        if record.migration_scale is not None:
            q.migration_scale.copy_(record.migration_scale)
        if record.input_scale is not None:
            q.input_scale.copy_(record.input_scale.reshape(1))
        return q

    @classmethod
    def from_linear(cls, linear: nn.Linear, qdtype: torch.dtype, migration_scale: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None):
        """Quantize a float linear (`lite.records.w8a8_record`); with `migration_scale` its columns are
        multiplied by it first. `input_scale` (one value) makes the input quantization static per tensor."""
        return cls.from_record(w8a8_record(linear, qdtype, migration_scale, input_scale))

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight, self.scale)  # (out, in) fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.migration_scale is not None:
            h = h / self.migration_scale
        if self.input_scale is not None:
            xs = self.input_scale  # (1,)
            xq = quantize(h, xs, self.qdtype)  # (..., in)
        else:
            xq, xs = quantize_per_token(h, self.qdtype)  # (..., in), (..., 1)
        y = integer_matmul(xq, self.weight) * xs * self.scale.T  # (..., out)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qdtype={self.qdtype}, bias={self.bias is not None}, "
                f"migration_scale={self.migration_scale is not None}, "
                f"input_scale={'static' if self.input_scale is not None else 'per-token'}")


class QRMSNorm(nn.Module):
    """RMSNorm whose output is quantized per token, as an engine's fused norm+quant kernel does.

    `offset` is 1 for Gemma (x · (1 + w)), 0 otherwise.
    """

    def __init__(self, hidden_size: int, eps: float, offset: float, qdtype: torch.dtype, dtype: torch.dtype,
                 device=None):
        super().__init__()
        self.eps, self.offset, self.qdtype = eps, offset, qdtype
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_norm(cls, norm: nn.Module, offset: float, qdtype: torch.dtype):
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
        q = cls(norm.weight.shape[0], eps, offset, qdtype, norm.weight.dtype, device=norm.weight.device)
        q.weight.copy_(norm.weight)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h * (self.offset + self.weight.float())
        return fake_quantize_per_token(h, self.qdtype).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, qdtype={self.qdtype}"



# Weight-only layouts (FORMATS.md): which tensors a WQLinear holds, by the `quantization_config` it is written under.
WEIGHT_ONLY_LAYOUTS = ("pack-quantized", "awq", "gptq", "gptq_v2")


class WQLinear(nn.Module):
    """y = x @ dequant(W)^T + b with W stored as `bits`-bit codes, one scale (and zero point) per group
    of `group_size` input columns (-1: per output channel). Its buffers are the checkpoint's tensors in
    `layout` (FORMATS.md), so a state dict is what the format stores:

    - `pack-quantized` (compressed-tensors): `weight_packed` int32 `(out, in·b/32)` packed along the
      input, `weight_scale` `(out, groups)` in the model dtype, `weight_shape` int64 `[out, in]`, and
      for asymmetric weights `weight_zero_point` int32 `(out·b/32, groups)` packed along the output;
    - `awq` (AutoAWQ GEMM, 4 bits): `qweight` `(in, out/8)`, `qzeros` `(groups, out/8)` in AWQ's
      interleaved order, `scales` fp16 `(groups, out)`;
    - `gptq` / `gptq_v2`: `qweight` `(in·b/32, out)`, `qzeros` `(groups, out·b/32)` (v1 stores zero - 1),
      `scales` fp16 `(groups, out)`, `g_idx` int32 `(in,)`.

    Symmetric weights use codes `[-2^(b-1), 2^(b-1))` stored with the offset 2^(b-1) (the zero point
    of the layouts that always store one). The forward dequantizes in fp32 and multiplies in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int, symmetric: bool,
                 layout: str, dtype: torch.dtype, device=None):
        super().__init__()
        assert layout in WEIGHT_ONLY_LAYOUTS, f"layout {layout!r} is not one of {WEIGHT_ONLY_LAYOUTS}"
        g = in_features if group_size == -1 else group_size
        assert in_features % g == 0, f"in_features {in_features} is not a multiple of group_size {g}"
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.symmetric, self.layout = symmetric, layout
        groups, words = in_features // g, lambda n: -(-n * bits // 32)

        def buf(name, shape, dt):
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))

        if layout == "pack-quantized":
            buf("weight_packed", (out_features, words(in_features)), torch.int32)
            buf("weight_scale", (out_features, groups), dtype)
            self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
            if not symmetric:
                buf("weight_zero_point", (words(out_features), groups), torch.int32)
        elif layout == "awq":
            buf("qweight", (in_features, out_features // 8), torch.int32)
            buf("qzeros", (groups, out_features // 8), torch.int32)
            buf("scales", (groups, out_features), torch.float16)
        else:
            buf("qweight", (words(in_features), out_features), torch.int32)
            buf("qzeros", (groups, words(out_features)), torch.int32)
            buf("scales", (groups, out_features), torch.float16)
            buf("g_idx", (in_features,), torch.int32)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.weight_scale.dtype if self.layout == "pack-quantized" else self.scales.dtype

    @classmethod
    @torch.no_grad()
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
                   bits: int, group_size: int, layout: str, dtype: torch.dtype):
        """From codes `(out, in)` on `lite.quant`'s grid (symmetric: signed, `zero` None; asymmetric:
        unsigned with `zero` `(out, groups)`) and `scale` `(out, groups)`, already representable in the
        layout's scale dtype (`round_scale`)."""
        from lite.quant import pack_awq, pack_gptq, pack_int32

        out_features, in_features = q.shape
        m = cls(in_features, out_features, bias is not None, bits, group_size, zero is None, layout, dtype,
                device=q.device)
        half = 1 << (bits - 1)
        q = q.to(torch.int32)
        codes = q + half if zero is None else q  # unsigned, (out, in), packed where it lies (the GPU in a sweep)
        zeros = torch.full_like(scale, half, dtype=torch.int32) if zero is None else zero  # (out, groups)
        g = in_features if group_size == -1 else group_size
        if layout == "pack-quantized":
            m.weight_packed.copy_(pack_int32(codes, bits))
            m.weight_scale.copy_(scale)
            if zero is not None:
                m.weight_zero_point.copy_(pack_int32(zeros.T.contiguous(), bits).T)
        elif layout == "awq":
            m.qweight.copy_(pack_awq(codes.T.contiguous()))
            m.qzeros.copy_(pack_awq(zeros.T.contiguous()))
            m.scales.copy_(scale.T)
        else:
            qweight, qzeros = pack_gptq(codes, zeros, bits, layout)
            m.qweight.copy_(qweight)
            m.qzeros.copy_(qzeros)
            m.scales.copy_(scale.T)
            m.g_idx.copy_(torch.arange(in_features, dtype=torch.int32) // g)
        if bias is not None:
            m.bias.copy_(bias)
        return m

    @classmethod
    def from_record(cls, record, layout: str, dtype: torch.dtype):
        """The WQLinear of `layout` storing a weight-only `lite.records.QuantizedWeight`, scales in `dtype`."""
        return cls.from_codes(record.codes, record.scale, record.zero, record.bias, record.bits, record.group_size,
                              layout, dtype)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unsigned codes `(out, in)`, fp32 scale `(out, groups)`, zero points `(out, groups)`) unpacked."""
        from lite.quant import unpack_awq, unpack_gptq, unpack_int32

        out_features, in_features, bits = self.out_features, self.in_features, self.bits
        if self.layout == "pack-quantized":
            q = unpack_int32(self.weight_packed, bits, in_features)
            scale = self.weight_scale.float()
            if self.symmetric:
                zero = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.int32, device=q.device)
            else:
                zero = unpack_int32(self.weight_zero_point.T.contiguous(), bits, out_features).T
        elif self.layout == "awq":
            q, zero = unpack_awq(self.qweight).T, unpack_awq(self.qzeros).T
            scale = self.scales.float().T
        else:
            q, zero = unpack_gptq(self.qweight, self.qzeros, bits, in_features, out_features, self.layout)
            scale = self.scales.float().T
        return q.contiguous(), scale.contiguous(), zero.contiguous()

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 `(out, in)`: `(q - zero) · scale` per group."""
        from lite.quant import dequantize_weight

        q, scale, zero = self.codes()
        return dequantize_weight(q, scale, zero, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)  # (out, in)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, layout={self.layout}, "
                f"bias={self.bias is not None}")
