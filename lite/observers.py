"""Observers: what a hook collects from every calibration token, with `update(x)`, `merge(other)` and
`result()`. The static-activation-scale observers (run by `lite/steps/static_scales.py`) and the
input Hessian of GPTQ and of the clip search (`Hessian`).

A static scheme quantizes each linear's input with one per-tensor scale fixed at export,
`input_scale = r / qmax` (qmax 127 for int8, 448 for fp8 e4m3), where r is the range an observer
picks from the calibration data:

- `minmax`: r = max|x| over every calibration token of every batch (a running absmax).
- `percentile`: r = the p-th percentile of |x|, so that the rarest outliers are clipped.
- `mse`: r = c · max|x| with the clip ratio c in (0, 1] minimizing the quantize-dequantize error
  mean((Q_r(x) - x)^2) over the data.

Percentile and mse need the values themselves, not only a running maximum: they keep a uniform
random sample of |x| over all tokens seen (at most `SAMPLE_SIZE` values per tensor, so memory stays
bounded however much calibration data there is). Both ranges are capped by the exact running absmax,
so they are never wider than minmax.

Linears that read the same tensor (q/k/v after the input norm, gate/up after the post-attention
norm) share one observer and therefore one scale: engines stack them into one GEMM with one input
scale.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from lite.archs import Arch, quantized_linears
from lite.errors import LiteError
from lite.quant import QMAX, dequantize, quantize

# Values of |x| kept per tensor for percentile and mse; 2^20 fp32 values are 4 MiB.
SAMPLE_SIZE = 2**20
# Clip ratios c tried by the mse observer: 0.20, 0.21, ..., 1.00 (times the absmax).
MSE_RATIOS = torch.linspace(0.2, 1.0, 81)

ACT_SCHEMES = ("dynamic", "static")


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx `(in, in)` in fp32 of x `(tokens, in)`. bf16/fp16 activations on a GPU go through the tensor
    cores with fp32 accumulation: their products are exact in fp32, so this is the fp32 product of the
    same values up to summation order, at about ten times the speed (0.1 TFLOP per Llama-3-8B down_proj
    and batch)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm's out_dtype
            pass
    x = x.float()
    return x.T @ x


class Hessian:
    """E[x xᵀ] over the tokens a linear reads, in fp32 on their device: the whole matrix (`group_size`
    -1, GPTQ's H up to a factor) or only its diagonal blocks, one `(g, g)` per group of `group_size`
    input channels (the clip search's). `result()` is `(groups, g, g)`."""

    def __init__(self, group_size: int = -1):
        self.group_size, self.sum, self.tokens = group_size, None, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        g = x.shape[1] if self.group_size == -1 else self.group_size
        if g == x.shape[1]:
            total = gram(x)[None]  # (1, in, in)
        else:
            xg = x.float().reshape(x.shape[0], -1, g).transpose(0, 1)  # (groups, tokens, g)
            total = torch.bmm(xg.transpose(1, 2), xg)  # (groups, g, g)
        self.sum = total if self.sum is None else self.sum.add_(total)
        self.tokens += x.shape[0]

    def merge(self, other: "Hessian") -> None:
        """Combine with an observer of disjoint tokens: the sums add exactly."""
        if other.sum is not None:
            self.sum = other.sum.clone() if self.sum is None else self.sum + other.sum.to(self.sum.device)
            self.tokens += other.tokens

    def result(self) -> torch.Tensor:
        return self.sum / self.tokens

    def release(self) -> None:
        """Drop the running sum once its result is taken (an 8B down_proj's is 0.8 GB)."""
        self.sum = None


class MinMax:
    """r = max|x| over every value seen.

    Every observer has `update(x)` (one more batch), `merge(other)` (fold in an observer of the same
    kind that saw other data: the result is what one observer of all the data gives, which is what
    splitting calibration over several GPUs needs) and `result()`.
    """

    def __init__(self, qdtype: torch.dtype):
        self.qdtype = qdtype
        self.absmax = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach())  # one read; max|x| = max(max x, -min x) exactly
        a = torch.maximum(high, -low).float()
        self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)

    def merge(self, other: "MinMax") -> None:
        if other.absmax is not None:
            self.absmax = other.absmax if self.absmax is None else torch.maximum(self.absmax, other.absmax)

    def result(self) -> torch.Tensor:
        return self.absmax


class _Sampled(MinMax):
    """A running absmax plus a uniform random sample of |x| over all values seen.

    Sampling without replacement by random keys: every value gets a key drawn from U(0, 1) and the
    `size` values with the smallest keys are kept, which is a uniform sample of everything seen so
    far whatever the batch sizes (values whose key is above the current cut cannot enter and are
    dropped before the merge).
    """

    def __init__(self, qdtype: torch.dtype, size: int = SAMPLE_SIZE, seed: int = 0):
        super().__init__(qdtype)
        self.size, self.seed = size, seed
        self.values = self.keys = self.generator = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        a = x.detach().reshape(-1).abs().float()  # (values,)
        if self.generator is None:
            self.generator = torch.Generator(device=a.device).manual_seed(self.seed)
        keys = torch.rand(a.numel(), generator=self.generator, device=a.device)
        if self.keys is not None:
            if self.keys.numel() >= self.size:
                keep = keys < self.keys.max()
                a, keys = a[keep], keys[keep]
            a, keys = torch.cat([self.values, a]), torch.cat([self.keys, keys])
        self._keep_smallest_keys(a, keys)

    def _keep_smallest_keys(self, values: torch.Tensor, keys: torch.Tensor) -> None:
        if keys.numel() > self.size:
            chosen = keys.topk(self.size, largest=False).indices
            values, keys = values[chosen], keys[chosen]
        self.values, self.keys = values, keys

    def merge(self, other: "_Sampled") -> None:
        """The `size` smallest keys of both samples: a uniform sample of the union, as if one observer
        had seen all of it (the keys are independent uniform draws in either observer; give the two
        observers different seeds)."""
        super().merge(other)
        if other.keys is None:
            return
        if self.keys is None:
            self.values, self.keys = other.values, other.keys
            return
        self._keep_smallest_keys(torch.cat([self.values, other.values]), torch.cat([self.keys, other.keys]))


class Percentile(_Sampled):
    """r = the `percentile`-th percentile of |x| (at most max|x|)."""

    def __init__(self, qdtype: torch.dtype, percentile: float = 99.99, **kw):
        super().__init__(qdtype, **kw)
        self.percentile = percentile

    def result(self) -> torch.Tensor:
        values = self.values.sort().values
        k = min(values.numel() - 1, max(0, int(round(self.percentile / 100 * values.numel())) - 1))
        return torch.minimum(values[k], self.absmax)


class Mse(_Sampled):
    """r = c · max|x| with c from `MSE_RATIOS` minimizing mean((Q_r(x) - x)^2) on the sample."""

    def result(self) -> torch.Tensor:
        return mse_range(self.values, self.absmax, self.qdtype)


def mse_range(values: torch.Tensor, absmax: torch.Tensor, qdtype: torch.dtype,
              ratios: torch.Tensor = MSE_RATIOS) -> torch.Tensor:
    """The clip range c · absmax (c in `ratios`) whose symmetric grid reproduces `values` best."""
    best, best_err = absmax, None
    for c in ratios.tolist():
        r = absmax * c
        if r <= 0:
            continue
        scale = r / QMAX[qdtype]
        err = (dequantize(quantize(values, scale, qdtype), scale) - values).pow(2).mean()
        if best_err is None or err < best_err:
            best, best_err = r, err
    return torch.minimum(best, absmax)


OBSERVERS = {"minmax": MinMax, "percentile": Percentile, "mse": Mse}


@dataclass(frozen=True)
class ActSettings:
    """How linear inputs are quantized: per token at run time, or with calibrated per-tensor scales."""

    act_scheme: str = "dynamic"
    act_observer: str = "minmax"
    act_percentile: float = 99.99

    def __post_init__(self):
        if self.act_scheme not in ACT_SCHEMES:
            raise LiteError(f"--act-scheme {self.act_scheme!r} is not one of: {', '.join(ACT_SCHEMES)}")
        if self.act_observer not in OBSERVERS:
            raise LiteError(f"--act-observer {self.act_observer!r} is not one of: {', '.join(OBSERVERS)}")
        if not 0.0 < float(self.act_percentile) <= 100.0:
            raise LiteError(f"--act-percentile must lie in (0, 100], got {self.act_percentile}")

    @property
    def static(self) -> bool:
        return self.act_scheme == "static"

    def observer(self, qdtype: torch.dtype):
        if self.act_observer == "percentile":
            return Percentile(qdtype, float(self.act_percentile))
        return OBSERVERS[self.act_observer](qdtype)


def input_groups(arch: Arch, block: nn.Module) -> list[tuple[str, ...]]:
    """The block's quantized linears grouped by the tensor they read: norm pairs together, others alone."""
    names = quantized_linears(arch, block)
    groups, grouped = [], set()
    for pair in arch.norm_pairs:
        group = tuple(name for name in pair.linears if name in names)
        if group:
            groups.append(group)
            grouped.update(group)
    return groups + [(name,) for name in names if name not in grouped]


def group_input(arch: Arch, group: tuple[str, ...]) -> tuple[str, str]:
    """(module, "output" or "input") where a hook sees the tensor a group of `input_groups` reads: the
    norm that makes it, for the readers of a norm (in a MoE block an expert's own input holds only its
    routed tokens unless every expert sees all), else the first linear's input."""
    for pair in arch.norm_pairs:
        if group == tuple(name for name in pair.linears if name not in arch.keep_float):
            return pair.norm, "output"
    return group[0], "input"
