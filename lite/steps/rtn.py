"""`rtn`: round-to-nearest W8A8 (int8 or fp8 e4m3, per output channel) of every linear in a block,
with the block's migration scales folded into the producers (or, for lmdeploy, stored on the QLinears).
`fmt` says which modules the checkpoint holds: lmdeploy's layout turns the norms feeding the linears
into QRMSNorms; compressed-tensors keeps them plain."""

from lite import compressed_tensors
from lite.export import quantize_block_
from lite.quant import quant_dtype_of
from lite.steps.base import Block, Step


class Rtn(Step):
    def __init__(self, quant_dtype: str = "int8", export_migration_scale: bool = False, fmt: str = "lmdeploy"):
        self.qdtype, self.export_migration_scale, self.fmt = quant_dtype_of(quant_dtype), export_migration_scale, fmt

    def apply_(self, block: Block) -> None:
        if self.fmt == "lmdeploy":
            quantize_block_(block.module, block.prefix, block.arch, block.config, self.qdtype, block.scales,
                            self.export_migration_scale)
        else:
            compressed_tensors.quantize_block_(block.module, block.prefix, block.arch, block.config, self.qdtype,
                                               block.scales, block.input_scales)
