"""`gptq`: weight-only quantization with GPTQ's error-compensating rounding (`lite.gptq`), block by block.

The block's calibration forward feeds one `Hessian` observer per group of linears that read the same
tensor (q/k/v share one, gate/up another); after it, each group is solved as one stacked weight and
each linear gets a record (`lite.records`), which the format's writer turns into its modules. The
next block sees this block's quantized outputs (`propagates_quantized`), so later blocks compensate
for earlier errors, as in the paper's sequential quantization.
"""

import torch

from lite.errors import LiteError, warn
from lite.gptq import gptq_quantize
from lite.observers import Hessian, group_input, input_groups
from lite.records import QuantizedWeight, compact_codes
from lite.smooth import fold_scales_
from lite.steps.base import Block, Hook, Step
from lite.steps.rtn import SCALE_DTYPES, scale_dtype
from lite.weight_only import WeightScheme


class Gptq(Step):
    """Settings: `bits`, `group_size` (-1: per channel), `symmetric`, `damp` (relative to the mean of
    diag H; raised tenfold while the factorization fails, and said so), `act_order` (with static
    groups), `block_size` (columns whose errors are spread at once), `mse` (search each group's
    clipping range), `scale_dtype` (`rtn`'s: where the group scales are rounded before the codes).

    With `quant_dtype: int8` the step writes W8A8 instead: GPTQ-rounded int8 weights per output channel
    (symmetric, `absmax / 127` as `rtn`'s) with per-token activations, after `smoothquant` in the same
    sweep (its scales are folded first, and the Hessians follow them)."""

    propagates_quantized = True

    def __init__(self, bits: int = 4, group_size: int = 128, symmetric: bool = True, damp: float = 0.01,
                 act_order: bool = True, block_size: int = 128, mse: bool = False, quant_dtype: str | None = None,
                 channel_fallback: bool = False, scale_dtype: str = "model"):
        if quant_dtype is not None:
            if quant_dtype != "int8":
                raise LiteError(f"gptq quant_dtype must be int8 (W8A8 with GPTQ rounding), got {quant_dtype!r}")
            if (bits, group_size, symmetric) not in ((4, 128, True), (8, -1, True)):  # the defaults, or said
                raise LiteError("gptq with quant_dtype int8 writes 8-bit symmetric weights per output channel; "
                                "leave out bits, group_size and symmetric")
            bits, group_size, symmetric = 8, -1, True
        self.qdtype = None if quant_dtype is None else torch.int8
        self.scheme = WeightScheme(bits, group_size, symmetric, channel_fallback)
        if not (isinstance(damp, (int, float)) and 0 < damp < 1):
            raise LiteError(f"--damp must lie in (0, 1) (relative to the mean Hessian diagonal), got {damp!r}")
        if not (isinstance(block_size, int) and block_size > 0):
            raise LiteError(f"gptq block_size must be a positive integer, got {block_size!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise LiteError(f"gptq scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
        self.damp, self.act_order, self.block_size, self.mse, self.scale_dtype = float(damp), bool(act_order), \
            block_size, bool(mse), scale_dtype
        self._observed = []
        self.raised_damping = {}  # {linear fqn: damping used} where the factorization needed more

    def observers(self, block: Block) -> list[Hook]:
        self._observed = [(group, Hessian()) for group in input_groups(block.arch, block.module)]
        return [Hook(*group_input(block.arch, group), observer) for group, observer in self._observed]

    @torch.no_grad()
    def apply_(self, block: Block) -> None:
        module = block.module
        # Scales left by an earlier step (awq, smoothquant) fold in first: the consumers then read x / s,
        # whose Hessian is H / (s sᵀ).
        fold_scales_(module, block.prefix, block.arch, block.config, block.scales)
        for group, observer in self._observed:
            linears = [module.get_submodule(name) for name in group]
            W = torch.cat([linear.weight for linear in linears])  # (Σ out, in): rows are independent given H
            if observer.tokens == 0:  # a MoE expert routing sent no token: plain rounding (H = I)
                warn(f"no calibration token reached {block.prefix}.{group[0].rpartition('.')[0]}: rounded to "
                     "nearest (--moe-calibrate-all-experts true gives every expert every token)")
                observer.update(torch.eye(W.shape[1], dtype=torch.float32, device=W.device))
            scheme = self.scheme.for_linear(W.shape[1])
            # The Hessian is handed over, not kept here: the solver permutes and factors it without a copy.
            codes, scale, zero, damp = gptq_quantize(
                W, _hessian(observer, block.scales.get(f"{block.prefix}.{group[0]}")), scheme.bits,
                scheme.group_size, scheme.symmetric, self.damp, self.act_order, self.block_size, self.mse,
                torch.float32 if self.qdtype is not None else scale_dtype(self.scale_dtype, W.dtype),
                overwrite_hessian=True)
            if damp != self.damp:
                fqns = ", ".join(f"{block.prefix}.{name}" for name in group)
                print(f"gptq: {fqns}: the Hessian needed damping {damp:g} (asked {self.damp:g}) to factorize")
                self.raised_damping.update({f"{block.prefix}.{name}": damp for name in group})
            first = 0
            for name, linear in zip(group, linears):
                rows = slice(first, first + linear.out_features)
                if self.qdtype is not None:  # int8 codes, fp32 scales (out, 1), activations per token
                    block.records[name] = QuantizedWeight(codes[rows].to(torch.int8), scale[rows].reshape(-1, 1),
                                                          linear.weight.dtype, bias=linear.bias)
                else:
                    block.records[name] = QuantizedWeight(compact_codes(codes[rows], zero is None), scale[rows],
                                                          linear.weight.dtype, True, scheme.bits, scheme.group_size,
                                                          None if zero is None else zero[rows], linear.bias)
                first = rows.stop
        self._observed = []


def _hessian(observer: Hessian, s: torch.Tensor | None) -> torch.Tensor:
    """E[x xᵀ] `(in, in)` of a group's inputs, the observer's sum released; with SmoothQuant or AWQ factors
    `s` folded in, the consumers read x / s, whose Hessian is H / (s sᵀ)."""
    H = observer.result()[0]
    observer.release()
    if s is not None:
        s = s.float().to(H.device)
        H.div_(torch.outer(s, s))  # in place: the same quotients, one (in, in) matrix less
    return H
