"""Modules that live in an exported model: `QLinear` (W8A8) and `QRMSNorm`.

Their forward is a plain-PyTorch reference of what an engine computes: weights int8 (or fp8 e4m3)
with one scale per output channel, activations quantized per token at run time (or, with a static
`input_scale`, with one calibrated scale per tensor). The integer GEMM is emulated in fp32, which
equals an int32 accumulation while partial sums stay below 2^24; on CUDA, int8 runs `torch._int_mm`
where its shape rules allow.
"""

import torch
import torch.nn as nn

from lite.quant import (dequantize, fake_quantize_per_token, quantize, quantize_per_channel, quantize_per_token,
                        row_chunks)


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
    def from_linear(cls, linear: nn.Linear, qdtype: torch.dtype, migration_scale: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None):
        """Quantize a float linear; with `migration_scale` its columns are multiplied by it first.

        `input_scale` (one value) makes the input quantization static per tensor.
        """
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, qdtype,
                linear.weight.dtype, migration_scale is not None, device=linear.weight.device,
                input_scale=input_scale is not None)
        if input_scale is not None:
            q.input_scale.copy_(input_scale.reshape(1))
        if migration_scale is not None:
            q.migration_scale.copy_(migration_scale)
        # Rows quantize independently: a chunk at a time keeps the fp32 copies of large weights small.
        for rows in row_chunks(*linear.weight.shape):
            w = linear.weight[rows].float()  # (rows, in)
            if migration_scale is not None:
                w = w * migration_scale  # (rows, in) · (in,)
            q.weight[rows], q.scale[rows] = quantize_per_channel(w, qdtype)
        if linear.bias is not None:
            q.bias.copy_(linear.bias)
        return q

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

