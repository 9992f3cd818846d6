"""Triton device code of CODA-Prompt's component mix (host launchers: l2p_fast/ops/coda_triton.py; math in
l2p_fast/ops/coda.py).

- ``coda_weights_kernel``: one program per (sample b, block of BLOCK_M components); one pass over the Dk axis
  accumulates n = Σ q·A·K, s2 = Σ (q·A)² and the key norm Σ K² together (each tile of K and A is read once per
  program), then α = n · 1/max(√s2, ε) · 1/max(‖K‖, ε). q ⊙ A is never stored.
- ``coda_rows_kernel``: out[i, r] = Σ_j c[i, j] · src[j, r] over a tile of BLOCK_R columns, j in order (the mix
  α·P with c = α; ∂P = αᵀ·g with c = αᵀ through the strides); rows outside [lo, hi) are written as zeros.
- ``coda_rowdot_kernel``: G[b, m] = base[b, m] + Σ_r g[b, r] · P[m, r] (∂L/∂α of the mix), BLOCK_M components
  per program, r in tiles, in order.

Accumulation in fp32 (fp64 for fp64 inputs); deterministic (no atomics).
"""

import triton
import triton.language as tl

from .assemble import _round_to

EPS = tl.constexpr(1e-12)


@triton.jit
def coda_weights_kernel(
    q_ptr, k_ptr, a_ptr, w_ptr,
    key_dim, used,
    ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < used
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    n = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    s2 = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    k2 = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    for d0 in range(0, key_dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < key_dim
        q = tl.load(q_ptr + b * key_dim + d, mask=dmask, other=0.0).to(acc_dtype)
        tile = mmask[:, None] & dmask[None, :]
        offs = m[:, None] * key_dim + d[None, :]
        k = tl.load(k_ptr + offs, mask=tile, other=0.0).to(acc_dtype)
        a = tl.load(a_ptr + offs, mask=tile, other=0.0).to(acc_dtype)
        qa = q[None, :] * a
        n += tl.sum(qa * k, axis=1)
        s2 += tl.sum(qa * qa, axis=1)
        k2 += tl.sum(k * k, axis=1)
    r_a = 1.0 / tl.maximum(tl.sqrt(s2), EPS)
    r_k = 1.0 / tl.maximum(tl.sqrt(k2), EPS)
    w = n * r_a * r_k
    if ACC_FP64:
        tl.store(w_ptr + b * used + m, w.to(w_ptr.dtype.element_ty), mask=mmask)
    else:
        tl.store(w_ptr + b * used + m, _round_to(w, w_ptr.dtype.element_ty), mask=mmask)


@triton.jit
def coda_rows_kernel(
    c_ptr, src_ptr, out_ptr,
    count, row, stride_ci, stride_cj, lo, hi,
    ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < row
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    acc = tl.zeros((BLOCK_R,), dtype=acc_dtype)
    if (i >= lo) & (i < hi):
        for j in range(0, count):
            c = tl.load(c_ptr + i * stride_ci + j * stride_cj).to(acc_dtype)
            acc += c * tl.load(src_ptr + j * row + r, mask=rmask, other=0.0).to(acc_dtype)
    if ACC_FP64:
        tl.store(out_ptr + i * row + r, acc.to(out_ptr.dtype.element_ty), mask=rmask)
    else:
        tl.store(out_ptr + i * row + r, _round_to(acc, out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def coda_rowdot_kernel(
    g_ptr, p_ptr, base_ptr, out_ptr,
    used, row,
    HAS_BASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < used
    acc_dtype = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    for r0 in range(0, row, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < row
        g = tl.load(g_ptr + b * row + r, mask=rmask, other=0.0).to(acc_dtype)
        p = tl.load(p_ptr + m[:, None] * row + r[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        acc += tl.sum(p.to(acc_dtype) * g[None, :], axis=1)
    if HAS_BASE:
        acc += tl.load(base_ptr + b * used + m, mask=mmask, other=0.0).to(acc_dtype)
    tl.store(out_ptr + b * used + m, acc, mask=mmask)
