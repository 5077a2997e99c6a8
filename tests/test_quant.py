"""lite.quant: quantize -> dequantize error bounds, zero rows, clamping. Pure tensor math, no models."""

import pytest
import torch

from lite.quant import (QMAX, dequantize, fake_quantize_per_token, quantize, quantize_per_channel,
                        quantize_per_token, symmetric_scale)

INT8, FP8 = torch.int8, torch.float8_e4m3fn


def random_matrices(count: int = 24):
    """Random `(rows, cols)` matrices of varied scale, with outlier columns and some all-zero rows."""
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        rows, cols = torch.randint(1, 40, (2,), generator=g).tolist()
        x = torch.randn(rows, cols, generator=g) * 10 ** torch.empty(1).uniform_(-4, 4, generator=g)
        if i % 3 == 0:  # activation-like outlier channels, 100x the rest
            x[:, torch.randint(0, cols, (max(1, cols // 8),), generator=g)] *= 100
        if i % 2 == 0:  # all-zero rows must stay exactly 0 and not divide by 0
            x[torch.rand(rows, generator=g) < 0.3] = 0
        yield x


@pytest.mark.parametrize("x", list(random_matrices()), ids=lambda x: f"{tuple(x.shape)}")
def test_int8_per_channel_error_is_at_most_half_a_step(x):
    q, scale = quantize_per_channel(x, INT8)

    assert q.dtype == INT8 and scale.dtype == torch.float32
    error = (dequantize(q, scale) - x).abs()
    # Half a step plus the fp32 rounding of x / scale (a few ulps of the value).
    assert (error <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all(), (error / scale).max()
    zero_rows = (x == 0).all(dim=1)
    assert (q[zero_rows] == 0).all() and torch.isfinite(scale).all()


@pytest.mark.parametrize("x", list(random_matrices()), ids=lambda x: f"{tuple(x.shape)}")
def test_int8_per_token_error_is_at_most_half_a_step(x):
    x3 = x.reshape(1, *x.shape)  # (batch, tokens, channels): scales over the last dimension only
    q, scale = quantize_per_token(x3, INT8)

    assert scale.shape == (1, x.shape[0], 1)
    error = (dequantize(q, scale) - x3).abs()
    assert (error <= scale / 2 * (1 + 1e-5) + 1e-6 * x3.abs()).all(), (error / scale).max()
    assert torch.equal(fake_quantize_per_token(x3, INT8), dequantize(q, scale))
    zero_tokens = (x3 == 0).all(dim=-1)
    assert (q[zero_tokens] == 0).all()


@pytest.mark.parametrize("x", list(random_matrices()), ids=lambda x: f"{tuple(x.shape)}")
def test_symmetric_int8_uses_the_full_range(x):
    """The largest |value| of each row maps to exactly ±127, so no code of the grid is wasted."""
    q, _ = quantize_per_channel(x, INT8)
    nonzero = (x != 0).any(dim=1)
    assert (q[nonzero].abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("x", list(random_matrices()), ids=lambda x: f"{tuple(x.shape)}")
def test_fp8_relative_error_is_bounded(x):
    """e4m3 keeps 3 mantissa bits: round to nearest errs by at most 2^-4 of the value for normal
    numbers; below the smallest normal (2^-6 on the scaled grid) the step is 2^-9, so at most 2^-10."""
    q, scale = quantize_per_channel(x, FP8)

    assert q.dtype == FP8
    error = (dequantize(q, scale) - x).abs()
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)
    assert (error <= bound).all(), ((error - bound) / scale).max()
    assert (q.float().abs() <= QMAX[FP8]).all()


def test_int8_clamps_instead_of_wrapping():
    """Values beyond the grid (a scale smaller than absmax / 127, e.g. a static scale) saturate."""
    x = torch.tensor([-1000.0, -128.4, -127.6, 0.0, 126.6, 127.4, 1000.0])

    q = quantize(x, torch.tensor(1.0), INT8)

    assert q.tolist() == [-128, -128, -128, 0, 127, 127, 127]


def test_fp8_clamps_to_448_instead_of_nan():
    """float8_e4m3fn has no infinity: an unclamped cast of 1e6 becomes NaN."""
    x = torch.tensor([-1e6, -449.0, 1.0, 449.0, 1e6])

    q = quantize(x, torch.tensor(1.0), FP8).float()

    assert torch.isfinite(q).all()
    assert q.tolist() == [-448.0, -448.0, 1.0, 448.0, 448.0]


def test_zero_absmax_gives_scale_one():
    scale = symmetric_scale(torch.tensor([0.0, 254.0]), INT8)

    assert scale.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_one_bad_element_and_accepts_huge_finite_values(dtype):
    from lite.quant import all_finite

    x = torch.randn(64, 33).to(dtype)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17, 5] = bad
        assert not all_finite(y)
    huge = torch.full((8, 8), torch.finfo(dtype).max, dtype=dtype)  # its sum overflows, yet nothing is bad
    assert all_finite(huge)
    assert all_finite(torch.empty(0, 4, dtype=dtype)) and all_finite(torch.ones(3, dtype=torch.int8))


def test_all_finite_checks_every_chunk_of_a_large_or_strided_tensor():
    """The sums go a chunk at a time (a whole-tensor fp32 sum copies a bf16 tensor to fp32 first): a bad
    value in the last, partial chunk, or in a transposed view, is still found."""
    from lite.quant import CHUNK_ELEMENTS, all_finite

    x = torch.zeros(2 * CHUNK_ELEMENTS + 5, dtype=torch.bfloat16)
    assert all_finite(x)
    x[-1] = float("nan")
    assert not all_finite(x)
    y = torch.zeros(64, 48, dtype=torch.bfloat16)
    y[3, 40] = float("inf")
    assert not all_finite(y.T) and all_finite(y[:, :40].T)
