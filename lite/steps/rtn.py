"""`rtn`: round-to-nearest quantization of every linear in a block.

Each quantized linear gets a record on `block.records` (`lite.records.QuantizedWeight`); the format's
writer turns them into its modules (`lite/formats.py`). The step knows no format.

- W8A8 (the default): int8 or fp8 e4m3 per output channel, with the block's migration scales folded
  into the producers (or, `export_migration_scale`, kept on the records) and the static input scales
  `static_scales` left on the block.
- Weight-only (`bits` given): `bits`-bit integers per group of `group_size` input columns,
  symmetric or with zero points, scales rounded to `scale_dtype` (the model's, or float16 as AutoAWQ
  and GPTQ store them) before the codes are computed. With `mse`, each group's clipping range is
  searched for the least squared error the group adds to the linear's output on the calibration
  tokens: dᵀ H_gg d with d the group's weight error and H_gg its block of E[x xᵀ] (observed in the
  block's forward).
  Scales left on the block by `awq` are folded in first.
"""

import torch

from lite.archs import quantized_linears
from lite.errors import LiteError
from lite.observers import Hessian, group_input, input_groups
from lite.quant import quant_dtype_of
from lite.records import QuantizedWeight, block_w8a8_records
from lite.smooth import fold_scales_
from lite.steps.base import Block, Hook, Step
from lite.weight_only import WeightScheme, quantize_rtn

# Where weight-only scales are rounded before the codes are computed: the model's dtype
# (compressed-tensors stores them so) or float16 (AutoAWQ and GPTQ store fp16 scales).
SCALE_DTYPES = ("model", "float16")


def scale_dtype(setting: str, model_dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if setting == "float16" else model_dtype


class Rtn(Step):
    def __init__(self, quant_dtype: str = "int8", export_migration_scale: bool = False, bits: int | None = None,
                 group_size: int = 128, symmetric: bool = True, mse: bool = False, channel_fallback: bool = False,
                 scale_dtype: str = "model"):
        if scale_dtype not in SCALE_DTYPES:
            raise LiteError(f"rtn scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
        self.qdtype, self.export_migration_scale = quant_dtype_of(quant_dtype), export_migration_scale
        self.scheme = None if bits is None else WeightScheme(bits, group_size, symmetric, channel_fallback)
        self.mse, self.scale_dtype = bool(mse), scale_dtype
        # only the clip search observes (Hessian blocks of each group: an fp32 copy of the inputs)
        self.activation_copy_bytes = 8 if self.scheme is not None and self.mse else 0
        self._hessians = []

    def observers(self, block: Block) -> list[Hook]:
        if self.scheme is None or not self.mse:
            return []
        groups = input_groups(block.arch, block.module)
        self._hessians = [(group, Hessian(self.scheme.for_linear(block.module.get_submodule(group[0]).in_features)
                                          .group_size)) for group in groups]
        return [Hook(*group_input(block.arch, group), observer) for group, observer in self._hessians]

    @torch.no_grad()
    def apply_(self, block: Block) -> None:
        if self.scheme is None:
            block.records.update(block_w8a8_records(block.module, block.prefix, block.arch, block.config, self.qdtype,
                                                    block.scales, self.export_migration_scale, block.input_scales))
            return
        fold_scales_(block.module, block.prefix, block.arch, block.config, block.scales)
        alone = [((name,), None) for name in quantized_linears(block.arch, block.module)]
        for group, observer in self._hessians or alone:
            hessian = None
            if observer is not None:
                hessian, s = observer.result(), block.scales.get(f"{block.prefix}.{group[0]}")
                if s is not None:  # the consumers read x / s once the scales are folded
                    s = s.float().reshape(hessian.shape[:2])  # (groups, g)
                    hessian = hessian / (s[:, :, None] * s[:, None, :])
            for name in group:
                linear = block.module.get_submodule(name)
                codes, scale, zero = quantize_rtn(linear.weight, self.scheme, self.mse,
                                                  scale_dtype(self.scale_dtype, linear.weight.dtype), hessian)
                own = self.scheme.for_linear(linear.in_features)
                block.records[name] = QuantizedWeight(codes, scale, linear.weight.dtype, True, own.bits,
                                                      own.group_size, zero, linear.bias)  # a byte per code
        self._hessians = []
