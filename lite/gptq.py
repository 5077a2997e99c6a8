"""The GPTQ solver (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1): pure tensor math, no modules.

Given a linear's weight W `(out, in)` and the Hessian of its layer-wise loss, H = Σ XᵀX over the
calibration tokens X `(tokens, in)`, GPTQ quantizes the input columns one at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian, so that
‖XWᵀ − XQᵀ‖² grows as little as possible. Rows are independent given H, so linears that read the
same input (q/k/v, gate/up) are solved together as one stacked weight.

- Damping: `damp · mean(diag H)` is added to the diagonal; when the Cholesky factorization still
  fails, the damping is multiplied by 10 (up to 4 times) and the value used is returned.
- act-order: columns in order of decreasing diag(H). With groups, the group parameters are computed
  up front from the unquantized weight ("static groups"), so each stored group covers consecutive
  input columns and the group map stays `i // group_size` (what every engine's kernel loads).
- Without act-order, a group's parameters are computed when its first column comes, from the weight
  as updated by the errors so far (the paper's grouping).
"""

import torch

from lite.errors import LiteError
from lite.kernels import gptq_columns, mse_clip, triton_available
from lite.quant import int_range, weight_qparams

DAMP_RETRIES = 4


def _qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, mse: bool, scale_dtype: torch.dtype,
             hessian: torch.Tensor):
    """(scale `(out, groups)` fp32 representable in `scale_dtype`, zero `(out, groups)` int32 or None);
    with `mse`, each group's clipping range minimizes the output error dᵀ H_gg d it adds, `hessian` the
    diagonal blocks `(groups, g, g)` of H."""
    if mse:
        scale, zero = mse_clip(w, bits, group_size, symmetric, hessian=hessian)
    else:
        scale, zero = weight_qparams(w, bits, group_size, symmetric)
    return scale.to(scale_dtype).float(), zero


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(U, damping used): U upper triangular with UᵀU = (H + λI)⁻¹, λ = damp · mean(diag H); `damp`
    multiplied by 10 until the factorization succeeds.

    With J the reversal permutation and J(H + λI)J = L Lᵀ (one Cholesky factorization), U = J L⁻¹ J: it is
    upper triangular and UᵀU = J L⁻ᵀ L⁻¹ J = (H + λI)⁻¹, the factor GPTQ needs, from one factorization
    and one triangular inverse instead of the paper's factorize, invert, factorize again.
    """
    mean_diag = torch.mean(torch.diag(H)).item()
    for attempt in range(DAMP_RETRIES + 1):
        # At most five (in, in) matrices at a time (H, this one, L, L⁻¹ and U): an 8B down_proj's is 0.8 GB.
        damped = H.flip(0, 1)
        damped.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            eye = damped.zero_()
            eye.diagonal().fill_(1.0)
            U = torch.linalg.solve_triangular(L, eye, upper=False)
            del L, eye, damped
            U = U.flip(0, 1)
            if bool(torch.isfinite(U).all()):
                return U, damp
        del L, damped
        damp *= 10
    raise LiteError(f"the Hessian could not be factorized even with damping {damp / 10:g}; the calibration "
                    "data may be too small for this layer: pass more --calib-samples")


@torch.no_grad()
def columns_reference(W1: torch.Tensor, U1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor | None, low: int,
                      high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's loop over the columns of one block (Algorithm 1, inner loop): (codes `(rows, count)` int32,
    scaled errors `(rows, count)`), W1 `(rows, count)` the block's columns as updated so far, U1 `(count, count)`
    the block of the upper Cholesky factor of H⁻¹, S1 / Z1 `(rows, count)` each column's scale and zero
    point (Z1 None: symmetric). `lite.kernels.gptq_columns` computes the same on a GPU."""
    W1 = W1.clone()
    Q1 = torch.empty_like(W1, dtype=torch.int32)
    Err1 = torch.empty_like(W1)
    for i in range(W1.shape[1]):
        col, s_col = W1[:, i], S1[:, i]
        q = torch.round(col / s_col)
        if Z1 is not None:
            q += Z1[:, i]
        q.clamp_(low, high)
        Q1[:, i] = q.to(torch.int32)
        if Z1 is not None:
            q -= Z1[:, i]
        err = (col - q * s_col) / U1[i, i]  # the paper's (w_q − quant(w_q)) / [H⁻¹]_qq
        W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
        Err1[:, i] = err
    return Q1, Err1


SUB_BLOCK = 32  # columns per Triton call: a (rows, 32) tile per program stays in registers


def columns_on_gpu(W1: torch.Tensor, U1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor | None, low: int,
                   high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`columns_reference` as the paper's two-level scheme once more: sub-blocks of `SUB_BLOCK` columns
    through the Triton loop (`lite.kernels.gptq_columns`), each sub-block's errors spread over the rest
    of the block with one matrix product."""
    W1 = W1.clone()
    count = W1.shape[1]
    Q1 = torch.empty_like(W1, dtype=torch.int32)
    Err1 = torch.empty_like(W1)
    for j in range(0, count, SUB_BLOCK):
        k = min(j + SUB_BLOCK, count)
        z = None if Z1 is None else Z1[:, j:k]
        columns = gptq_columns if (k - j) & (k - j - 1) == 0 else columns_reference  # powers of two only
        Q1[:, j:k], Err1[:, j:k] = columns(W1[:, j:k], U1[j:k, j:k], S1[:, j:k], z, low, high)
        W1[:, k:].addmm_(Err1[:, j:k], U1[j:k, k:], alpha=-1)
    return Q1, Err1


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = True,
                  damp: float = 0.01, act_order: bool = True, block_size: int = 128, mse: bool = False,
                  scale_dtype: torch.dtype = torch.float32, overwrite_hessian: bool = False):
    """(codes `(out, in)` int32 on `lite.quant`'s grid, scale `(out, groups)` fp32, zero `(out, groups)`
    int32 or None (symmetric), damping used) for the weight `w` `(out, in)` and Hessian `H` `(in, in)`.

    Dequantizing `(codes - zero) · scale` per group gives the quantized weight. `scale` is representable
    in `scale_dtype` (what the format stores), and the codes are computed with that rounded scale.
    `overwrite_hessian`: an fp32 `H` the caller no longer needs is changed in place, not copied (at most
    four (in, in) matrices are alive at once: H, its damped copy, the Cholesky factor and its inverse).
    """
    out_features, in_features = w.shape
    W = w.float().clone()  # (out, in), updated in place as errors spread
    H = H.float() if overwrite_hessian else H.float().clone()  # (in, in)
    dead = torch.diag(H) == 0  # inputs that were always zero: any value is exact; quantize them as 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = in_features if group_size == -1 else group_size
    low, high = int_range(bits, symmetric)

    # H's diagonal blocks, one per group, in the stored order: `(groups, g, g)`, a copy (H is permuted below)
    blocks = H.reshape(in_features // g, g, in_features // g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone() \
        if mse else None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        H.copy_(H[perm[:, None], perm])  # permuted in place, through one temporary (in, in)
    else:
        perm = torch.arange(in_features, device=W.device)
    static = act_order or group_size == -1
    if static:  # every group's parameters from the unquantized weight, in the stored (original) order
        scale, zero = _qparams(W, bits, group_size, symmetric, mse, scale_dtype, blocks)
    else:
        scale = torch.empty((out_features, in_features // g), device=W.device)
        zero = None if symmetric else torch.empty((out_features, in_features // g), dtype=torch.int32,
                                                  device=W.device)
    W = W[:, perm]
    group_of = perm // g  # (in,) group of each column in solving order
    U, damp_used = inverse_hessian_factor(H, damp)
    del H

    if not static:  # a group's columns must fall in one block, so that its parameters see the updated weight
        block_size = g * max(1, block_size // g)
    Q = torch.empty_like(W, dtype=torch.int32)  # (out, in) codes in solving order
    fast = static and triton_available(W.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        U1 = U[i1:i2, i1:i2]
        if static:
            S1 = scale[:, group_of[i1:i2]]  # (out, count) scale of each column
            Z1 = None if zero is None else zero[:, group_of[i1:i2]].float()
            count = i2 - i1
            columns = columns_on_gpu if fast else columns_reference
            Q[:, i1:i2], Err1 = columns(W[:, i1:i2], U1, S1, Z1, low, high)
        else:
            W1 = W[:, i1:i2].clone()  # (out, count)
            Err1 = torch.empty_like(W1)
            for j in range(i1, i2, g):  # each group's parameters from its columns as updated so far
                s, z = _qparams(W1[:, j - i1:j - i1 + g], bits, -1, symmetric, mse, scale_dtype,
                                None if blocks is None else blocks[j // g:j // g + 1])
                scale[:, j // g] = s[:, 0]
                if zero is not None:
                    zero[:, j // g] = z[:, 0]
                cols = slice(j - i1, j - i1 + g)
                Q[:, j:j + g], Err1[:, cols] = columns_reference(
                    W1[:, cols], U1[cols, cols], s.expand(-1, g), None if z is None else z.float().expand(-1, g),
                    low, high)
                W1[:, cols.stop:].addmm_(Err1[:, cols], U1[cols, cols.stop:], alpha=-1)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)  # the block's errors, spread over later columns at once
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes, scale, zero, damp_used
