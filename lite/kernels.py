"""GPU kernels (Triton), each with the plain-PyTorch function it replaces named, and used only on CUDA
when Triton is importable; CPU runs and tests use the reference.

`gptq_columns`: the inner loop of GPTQ (`lite.gptq`) over one block of B columns with fixed (static)
group parameters. The reference issues about a dozen tiny kernels per column (0.85 M columns for a
Llama-3-8B); here one program holds R rows × B columns in registers and walks the columns itself.

`clip_search`: `lite.quant.mse_clip`, every clip ratio tried on a tile of rows of one group in one pass.
"""

import torch


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_kernel = None


def _import_triton():
    """Triton's modules, also as this module's globals, where kernels look names up (the interpreter
    of TRITON_INTERPRET=1, which runs these kernels on a CPU for debugging, sees only globals)."""
    import triton
    import triton.language as tl

    @triton.jit
    def round_half_even(x):
        """torch.round: to nearest, ties to even (exact while |x| < 2^23, as these codes are)."""
        f = tl.floor(x)
        frac = x - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, tl.where(odd, f + 1.0, f)))

    globals().update(triton=triton, tl=tl, round_half_even=round_half_even)
    return triton, tl, round_half_even


def _build():
    triton, tl, round_half_even = _import_triton()

    @triton.jit
    def gptq_columns_kernel(W, U, S, Z, Q, E, rows, stride_w, stride_u, stride_s, stride_z, stride_q, stride_e,
                            low, high, HAS_ZERO: tl.constexpr, B: tl.constexpr, R: tl.constexpr):
        r = tl.program_id(0) * R + tl.arange(0, R)  # (R,) rows of this program
        c = tl.arange(0, B)  # (B,) columns of the block
        inside = (r < rows)[:, None]
        w = tl.load(W + r[:, None] * stride_w + c[None, :], mask=inside, other=0.0)  # (R, B)
        s = tl.load(S + r[:, None] * stride_s + c[None, :], mask=inside, other=1.0)
        if HAS_ZERO:
            z = tl.load(Z + r[:, None] * stride_z + c[None, :], mask=inside, other=0.0)
        codes = tl.zeros((R, B), dtype=tl.int32)
        errors = tl.zeros((R, B), dtype=tl.float32)
        for i in range(B):
            here = (c == i)[None, :]  # (1, B)
            col = tl.sum(tl.where(here, w, 0.0), axis=1)  # (R,) the column as updated so far
            s_i = tl.sum(tl.where(here, s, 0.0), axis=1)
            u = tl.load(U + i * stride_u + c)  # (B,) row i of the upper factor (zero left of the diagonal)
            d = tl.sum(tl.where(c == i, u, 0.0), axis=0)
            q = round_half_even(tl.math.div_rn(col, s_i))  # round half to even, as torch.round
            if HAS_ZERO:
                z_i = tl.sum(tl.where(here, z, 0.0), axis=1)
                q = tl.minimum(tl.maximum(q + z_i, low), high)
                dq = (q - z_i) * s_i
            else:
                q = tl.minimum(tl.maximum(q, low), high)
                dq = q * s_i
            err = tl.math.div_rn(col - dq, d)  # (R,)
            w = w - err[:, None] * u[None, :]
            codes = tl.where(here, q.to(tl.int32)[:, None], codes)
            errors = tl.where(here, err[:, None], errors)
        tl.store(Q + r[:, None] * stride_q + c[None, :], codes, mask=inside)
        tl.store(E + r[:, None] * stride_e + c[None, :], errors, mask=inside)

    return gptq_columns_kernel


ROWS_PER_PROGRAM = 32


def gptq_columns(W1: torch.Tensor, U1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor | None, low: int, high: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes `(rows, B)` int32, errors `(rows, B)` fp32) of GPTQ's column loop over one block: W1 `(rows, B)`
    fp32, U1 `(B, B)` the block of the upper Cholesky factor of H⁻¹, S1 / Z1 `(rows, B)` each column's
    scale and zero point (Z1 None: symmetric). The same as `lite.gptq`'s loop up to fp32 rounding."""
    global _kernel
    import triton

    if _kernel is None:
        _kernel = _build()
    rows, B = W1.shape
    assert B & (B - 1) == 0, f"the Triton column loop needs a power-of-two block, got {B}"
    W1, U1, S1 = W1.contiguous(), U1.contiguous(), S1.contiguous()
    Z1 = S1 if Z1 is None else Z1.contiguous()  # unused when symmetric
    Q1 = torch.empty((rows, B), dtype=torch.int32, device=W1.device)
    E1 = torch.empty((rows, B), dtype=torch.float32, device=W1.device)
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _kernel[grid](W1, U1, S1, Z1, Q1, E1, rows, W1.stride(0), U1.stride(0), S1.stride(0), Z1.stride(0),
                  Q1.stride(0), E1.stride(0), float(low), float(high), HAS_ZERO=Z1 is not S1, B=B,
                  R=ROWS_PER_PROGRAM)
    return Q1, E1


_clip_kernel = None


def _build_clip():
    triton, tl, round_half_even = _import_triton()

    @triton.jit
    def clip_search_kernel(X, H, C, SCALE, ZERO, rows, n_clips, stride_x, stride_s, low, high,
                           SYM: tl.constexpr, HESS: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
        r = tl.program_id(0) * R + tl.arange(0, R)  # (R,) rows
        j = tl.program_id(1)  # the group
        c = tl.arange(0, G)
        inside = r < rows
        x = tl.load(X + r[:, None] * stride_x + j * G + c[None, :], mask=inside[:, None], other=0.0)  # (R, G)
        if HESS:
            h = tl.load(H + j * G * G + c[:, None] * G + c[None, :])  # (G, G), this group's block of E[x xᵀ]
        if SYM:
            absmax = tl.max(tl.abs(x), axis=1)
        else:
            lo0 = tl.minimum(tl.min(x, axis=1), 0.0)
            hi0 = tl.maximum(tl.max(x, axis=1), 0.0)
        best = tl.full((R,), float("inf"), tl.float32)
        best_scale = tl.full((R,), 1.0, tl.float32)
        best_zero = tl.zeros((R,), tl.float32)
        for k in range(n_clips):
            ratio = tl.load(C + k)
            if SYM:
                a = absmax * ratio
                scale = tl.where(a > 0, tl.math.div_rn(a, high), 1.0)
                q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x, scale[:, None])), low), high)
                zero = tl.zeros((R,), tl.float32)
            else:
                lo, hi = lo0 * ratio, hi0 * ratio
                scale = tl.math.div_rn(hi - lo, high - low)
                scale = tl.where(scale > 0, scale, 1.0)
                zero = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(-lo, scale)), low), high)
                q = round_half_even(tl.math.div_rn(x, scale[:, None])) + zero[:, None]
                q = tl.minimum(tl.maximum(q, low), high) - zero[:, None]
            d = q * scale[:, None] - x  # (R, G)
            if HESS:
                # tf32 products: the criterion only ranks clip ratios, and a near-tie broken the other way
                # costs nothing measurable, while fp32 products made this kernel 5x slower
                err = tl.sum(tl.dot(d, h, input_precision="tf32") * d, axis=1)
            else:
                err = tl.sum(d * d, axis=1)
            better = err < best
            best = tl.where(better, err, best)
            best_scale = tl.where(better, scale, best_scale)
            best_zero = tl.where(better, zero, best_zero)
        tl.store(SCALE + r * stride_s + j, best_scale, mask=inside)
        tl.store(ZERO + r * stride_s + j, best_zero, mask=inside)

    return clip_search_kernel


def clip_search_supported(x: torch.Tensor, group_size: int) -> bool:
    """Whether `clip_search` takes this case: a CUDA weight, groups of a power of two from 16 to 128."""
    return triton_available(x.device) and 16 <= group_size <= 128 and group_size & (group_size - 1) == 0


def clip_search(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, clips: torch.Tensor,
                hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`lite.quant.mse_clip` (plain or `hessian`-weighted) in one pass over the weight: each program holds
    R rows of one group and tries every clip ratio on them. (scale, zero) as `mse_clip` returns them."""
    global _clip_kernel
    import triton

    from lite.quant import int_range

    if _clip_kernel is None:
        _clip_kernel = _build_clip()
    x = x.float().contiguous()
    rows, n = x.shape
    groups = n // group_size
    low, high = int_range(bits, symmetric)
    scale = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    h = x if hessian is None else hessian.float().contiguous()  # unused without a Hessian
    R = 32
    grid = (triton.cdiv(rows, R), groups)
    _clip_kernel[grid](x, h, clips.to(device=x.device, dtype=torch.float32), scale, zero, rows, len(clips),
                       x.stride(0), scale.stride(0), float(low), float(high), SYM=symmetric,
                       HESS=hessian is not None, G=group_size, R=R, num_warps=8)
    return scale, None if symmetric else zero.to(torch.int32)


def mse_clip(w: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = True, clips: torch.Tensor | None = None,
             hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`lite.quant.mse_clip`, through `clip_search` where it applies (a CUDA weight, groups of 16 to 128)."""
    from lite import quant

    clips = quant.MSE_CLIPS if clips is None else clips
    if clip_search_supported(w, group_size):
        return clip_search(w, bits, group_size, symmetric, clips, hessian)
    return quant.mse_clip(w, bits, group_size, symmetric, clips, hessian)

