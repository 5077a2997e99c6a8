"""Weight-only int2..int8 math of issue 10: grids, error bounds, clip search, and exact packing."""

import pytest
import torch

from lite.quant import (dequantize_weight, int_range, mse_clip, pack_awq, pack_gptq, pack_int32, quantize_weight,
                        unpack_awq, unpack_gptq, unpack_int32, weight_qparams)


def weight(out=16, inp=256, seed=0):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    w[3, 17] = 9.0  # an outlier
    w[5] = 0.0  # an all-zero row
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group_size, symmetric):
    w = weight()
    scale, zero = weight_qparams(w, bits, group_size, symmetric)
    q = quantize_weight(w, scale, zero, bits, group_size)
    low, high = int_range(bits, symmetric)
    assert int(q.min()) >= low and int(q.max()) <= high
    error = (dequantize_weight(q, scale, zero, group_size) - w).abs()
    step = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)  # (out, in)
    assert torch.all(error <= step / 2 + 1e-6 * step)
    assert torch.all(dequantize_weight(q, scale, zero, group_size)[5] == 0)  # zero stays exactly zero
    if not symmetric:
        assert zero.dtype == torch.int32 and torch.all((zero >= low) & (zero <= high))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_is_never_worse_than_round_to_nearest_and_helps_with_an_outlier(symmetric):
    w = weight()
    rtn = weight_qparams(w, 4, 32, symmetric)
    mse = mse_clip(w, 4, 32, symmetric)

    def err(qp):
        return (dequantize_weight(quantize_weight(w, *qp, 4, 32), *qp, 32) - w).pow(2).reshape(16, 8, 32).sum(-1)

    assert torch.all(err(mse) <= err(rtn) + 1e-6)
    assert err(mse).sum() < err(rtn).sum()


def test_pack_quantized_example_from_formats_md():
    """FORMATS.md: int4 values [-8, -7, 0, 1, 2, 3, 4, 7] (offset by 8) pack to the word 0xfcba9810."""
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]]) + 8
    packed = pack_int32(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert packed.item() & 0xFFFFFFFF == 0xFCBA9810


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips_bit_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (5, 77), generator=g, dtype=torch.int32)  # 77: words straddle for 3 bits
    packed = pack_int32(q, bits)
    assert packed.shape == (5, -(-77 * bits // 32))
    assert torch.equal(unpack_int32(packed, bits, 77), q)


def test_awq_order_puts_column_order_j_in_nibble_j():
    """Written out by hand: the first word of a row holds columns 0, 2, 4, 6, 1, 3, 5, 7 in nibbles 0..7."""
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0]])
    packed = pack_awq(q)
    expected = sum(v << (4 * j) for j, v in enumerate([1, 3, 5, 7, 2, 4, 6, 8]))
    assert packed.shape == (1, 2) and packed[0, 0].item() & 0xFFFFFFFF == expected
    assert torch.equal(unpack_awq(packed), q)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_packing_layout_and_zero_convention(checkpoint_format):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.int32)  # (out, in)
    zero = torch.full((16, 2), 8, dtype=torch.int32)  # a symmetric 4-bit zero, 2 groups of 32

    qweight, qzeros = pack_gptq(q, zero, 4, checkpoint_format)

    assert qweight.shape == (64 * 4 // 32, 16) and qzeros.shape == (2, 16 * 4 // 32)
    # Word r of output column o holds input rows 8r..8r+7, row 8r in the lowest nibble.
    assert (qweight[1, 3].item() & 0xF) == q[3, 8] and ((qweight[1, 3].item() >> 4) & 0xF) == q[3, 9]
    stored = 7 if checkpoint_format == "gptq" else 8  # FORMATS.md: v1 stores a zero of 8 as 7
    assert (qzeros[0, 0].item() & 0xF) == stored
    assert all(torch.equal(a, b) for a, b in zip(unpack_gptq(qweight, qzeros, 4, 64, 16, checkpoint_format), (q, zero)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_in_row_chunks_gives_the_same_words(bits, monkeypatch):
    """Large code tensors are packed a chunk of rows at a time (their int64 temporaries stay small): the
    same words as packing all rows at once, for 2-D codes and for AWQ's 3-D grouped ones."""
    from lite import quant

    g = torch.Generator().manual_seed(bits)
    flat = torch.randint(0, 1 << bits, (37, 64), generator=g, dtype=torch.int32)
    grouped = torch.randint(0, 1 << bits, (9, 5, 8), generator=g, dtype=torch.int32)
    whole = [quant.pack_int32(flat, bits), quant.pack_int32(grouped, bits)]
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 100)  # a few rows per chunk
    assert torch.equal(quant.pack_int32(flat, bits), whole[0])
    assert torch.equal(quant.pack_int32(grouped, bits), whole[1])
