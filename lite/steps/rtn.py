"""`rtn`: round-to-nearest W8A8 (int8 or fp8 e4m3, per output channel) of every linear in a block,
with the block's migration scales folded into the producers (or stored on the QLinears)."""

from lite.export import quantize_block_
from lite.quant import quant_dtype_of
from lite.steps.base import Block, Step


class Rtn(Step):
    def __init__(self, quant_dtype: str = "int8", export_migration_scale: bool = False):
        self.qdtype, self.export_migration_scale = quant_dtype_of(quant_dtype), export_migration_scale

    def apply_(self, block: Block) -> None:
        quantize_block_(block.module, block.prefix, block.arch, block.config, self.qdtype, block.scales,
                        self.export_migration_scale)
