"""`rtn`: round-to-nearest quantization of every linear in a block.

- W8A8 (the default): int8 or fp8 e4m3 per output channel, with the block's migration scales folded
  into the producers (or, for lmdeploy, stored on the QLinears). `fmt` says which modules the
  checkpoint holds: lmdeploy's layout turns the norms feeding the linears into QRMSNorms;
  compressed-tensors keeps them plain.
- Weight-only (`bits` given): `bits`-bit integers per group of `group_size` input columns,
  symmetric or with zero points, optionally with each group's clipping range searched (`mse`);
  the linears become WQLinears of `fmt`'s layout (compressed-tensors pack-quantized, awq, gptq).
"""

import torch

from lite import compressed_tensors
from lite.archs import quantized_linears
from lite.export import quantize_block_
from lite.quant import quant_dtype_of
from lite.smooth import fold_scales_
from lite.steps.base import Block, Step
from lite.weight_only import WeightScheme, quantize_rtn, scale_dtype_of, swap_quantized_


class Rtn(Step):
    def __init__(self, quant_dtype: str = "int8", export_migration_scale: bool = False, fmt: str = "lmdeploy",
                 bits: int | None = None, group_size: int = 128, symmetric: bool = True, mse: bool = False):
        self.qdtype, self.export_migration_scale, self.fmt = quant_dtype_of(quant_dtype), export_migration_scale, fmt
        self.scheme = None if bits is None else WeightScheme(bits, group_size, symmetric)
        self.mse = bool(mse)

    @torch.no_grad()
    def apply_(self, block: Block) -> None:
        if self.scheme is not None:
            fold_scales_(block.module, block.prefix, block.arch, block.config, block.scales)
            for name in quantized_linears(block.arch, block.module):
                w = block.module.get_submodule(name).weight
                codes, scale, zero = quantize_rtn(w, self.scheme, self.mse, scale_dtype_of(self.fmt, w.dtype))
                swap_quantized_(block.module, name, codes, scale, zero, self.fmt, self.scheme)
        elif self.fmt == "lmdeploy":
            quantize_block_(block.module, block.prefix, block.arch, block.config, self.qdtype, block.scales,
                            self.export_migration_scale)
        else:
            compressed_tensors.quantize_block_(block.module, block.prefix, block.arch, block.config, self.qdtype,
                                               block.scales, block.input_scales)
