"""lite.records: what the quantizing steps produce, and the formats' writers that turn records into modules.

Properties: a W8A8 record dequantizes within half a step of the weight it quantizes (times the
migration scale it keeps, when kept); the `rtn` step leaves records and no quantized module (it knows
no format); the same records realized by two formats give the same codes and scales; a sweep that
quantizes needs a writer.
"""

import copy

import pytest
import torch

from helpers import arch_of, blocks_of
from lite.archs import quantized_linears
from lite.compressed_tensors import realize_ as realize_compressed_tensors
from lite.export import realize_ as realize_lmdeploy
from lite.model import build_tiny
from lite.qmodules import QLinear, QRMSNorm
from lite.records import block_w8a8_records
from lite.source import Loaded
from lite.steps.base import Block
from lite.steps.rtn import Rtn
from lite.sweep import sweep


def first_block(model_type="llama"):
    model = build_tiny(model_type, seed=3)
    prefix, block = next(iter(blocks_of(model).items()))
    return model, prefix, block


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_a_w8a8_record_dequantizes_within_half_a_step_of_the_weight_it_keeps(qdtype):
    model, prefix, block = first_block()
    arch = arch_of(model)
    names = quantized_linears(arch, block)
    gen = torch.Generator().manual_seed(0)
    scales = {f"{prefix}.{n}": torch.rand(block.get_submodule(n).in_features, generator=gen) + 0.5 for n in names}
    weights = {n: block.get_submodule(n).weight.detach().clone() for n in names}
    records = block_w8a8_records(block, prefix, arch, model.config, qdtype, scales, export_migration_scale=True)
    assert set(records) == set(names)
    for name, r in records.items():
        assert r.codes.dtype == qdtype and r.scale.shape == (r.codes.shape[0], 1) and not r.weight_only
        assert torch.equal(r.migration_scale, scales[f"{prefix}.{name}"])
        kept = weights[name].float() * scales[f"{prefix}.{name}"]  # (out, in), the columns times s
        # half a step: int8's is the scale; e4m3's is 2^-3 of the value's binade (2^-9 of the scale below
        # the smallest normal), so half of it is at most |w| / 16 + scale / 1024
        half = r.scale / 2 if qdtype == torch.int8 else kept.abs() / 16 + r.scale / 1024
        assert ((r.codes.float() * r.scale - kept).abs() <= half * (1 + 1e-6) + 1e-12).all(), name
        # the weight itself is left as it was: the factors live on the record
        assert torch.equal(block.get_submodule(name).weight, weights[name])


def test_rtn_leaves_records_and_no_quantized_module():
    model, prefix, block = first_block()
    b = Block(0, prefix, block, arch_of(model), model.config)
    Rtn("int8").apply_(b)
    assert set(b.records) == set(quantized_linears(arch_of(model), block))
    assert not any(isinstance(m, (QLinear, QRMSNorm)) for m in block.modules())


def test_two_formats_realize_the_same_records_into_the_same_codes():
    model, prefix, block = first_block()
    records = block_w8a8_records(block, prefix, arch_of(model), model.config, torch.int8, {})
    lmdeploy, compressed = copy.deepcopy(block), copy.deepcopy(block)
    realize_lmdeploy(lmdeploy, prefix, arch_of(model), records)
    realize_compressed_tensors(compressed, prefix, arch_of(model), records)
    for name in records:
        a, b = lmdeploy.get_submodule(name), compressed.get_submodule(name)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale)
    # only lmdeploy's engine quantizes inside its norms
    assert any(isinstance(m, QRMSNorm) for m in lmdeploy.modules())
    assert not any(isinstance(m, QRMSNorm) for m in compressed.modules())


def test_a_sweep_that_quantizes_needs_a_writer():
    model = build_tiny("llama", seed=3)
    with pytest.raises(AssertionError, match="no writer"):
        sweep(Loaded(model, arch_of(model)), [Rtn("int8")], None, None, progress=False)
