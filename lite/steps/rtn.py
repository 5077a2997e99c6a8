"""`rtn`: round-to-nearest quantization of every linear in a block.

- W8A8 (the default): int8 or fp8 e4m3 per output channel, with the block's migration scales folded
  into the producers (or, for lmdeploy, stored on the QLinears). `fmt` says which modules the
  checkpoint holds: lmdeploy's layout turns the norms feeding the linears into QRMSNorms;
  compressed-tensors keeps them plain.
- Weight-only (`bits` given): `bits`-bit integers per group of `group_size` input columns,
  symmetric or with zero points; the linears become WQLinears of `fmt`'s layout (compressed-tensors
  pack-quantized, awq, gptq). With `mse`, each group's clipping range is searched for the least
  squared error the group adds to the linear's output on the calibration tokens: dᵀ H_gg d with d the
  group's weight error and H_gg its block of E[x xᵀ] (observed in the block's forward).
  Scales left on the block by `awq` are folded in first.
"""

import torch

from lite import compressed_tensors
from lite.archs import quantized_linears
from lite.export import quantize_block_
from lite.quant import quant_dtype_of
from lite.smooth import fold_scales_
from lite.observers import Hessian, group_input, input_groups
from lite.steps.base import Block, Hook, Step
from lite.weight_only import WeightScheme, quantize_rtn, scale_dtype_of, swap_quantized_


class Rtn(Step):
    def __init__(self, quant_dtype: str = "int8", export_migration_scale: bool = False, fmt: str = "lmdeploy",
                 bits: int | None = None, group_size: int = 128, symmetric: bool = True, mse: bool = False,
                 channel_fallback: bool = False):
        self.qdtype, self.export_migration_scale, self.fmt = quant_dtype_of(quant_dtype), export_migration_scale, fmt
        self.scheme = None if bits is None else WeightScheme(bits, group_size, symmetric, channel_fallback)
        self.mse = bool(mse)
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
        if self.scheme is not None:
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
                    w = block.module.get_submodule(name).weight
                    codes, scale, zero = quantize_rtn(w, self.scheme, self.mse, scale_dtype_of(self.fmt, w.dtype),
                                                      hessian)
                    swap_quantized_(block.module, name, codes, scale, zero, self.fmt, self.scheme)
            self._hessians = []
        elif self.fmt == "lmdeploy":
            quantize_block_(block.module, block.prefix, block.arch, block.config, self.qdtype, block.scales,
                            self.export_migration_scale)
        else:
            compressed_tensors.quantize_block_(block.module, block.prefix, block.arch, block.config, self.qdtype,
                                               block.scales, block.input_scales)
