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
    r_a = 1.0 / tl.maximum(tl.sqrt(s2), EPS, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN (as clamp_min)
    r_k = 1.0 / tl.maximum(tl.sqrt(k2), EPS, propagate_nan=tl.PropagateNan.ALL)
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


@triton.jit
def coda_grad_factors_kernel(
    q_ptr, k_ptr, a_ptr, w_ptr, g_ptr, gn_ptr, gs_ptr, gw_ptr, rk_ptr,
    key_dim, used,
    ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per (sample b, block of components): ∂n = G·r_a·r_k, ∂s2 = −½·G·α·r_a² (0 where √s2 ≤ ε), G·α, and (b = 0)
    r_k² (0 where ‖K‖ ≤ ε); s2 and ‖K‖² recomputed in one pass over Dk, as in the forward."""
    b = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < used
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    s2 = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    k2 = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    for d0 in range(0, key_dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < key_dim
        q = tl.load(q_ptr + b * key_dim + d, mask=dmask, other=0.0).to(acc_dtype)
        tile = mmask[:, None] & dmask[None, :]
        offs = m[:, None] * key_dim + d[None, :]
        k = tl.load(k_ptr + offs, mask=tile, other=0.0).to(acc_dtype)
        qa = q[None, :] * tl.load(a_ptr + offs, mask=tile, other=0.0).to(acc_dtype)
        s2 += tl.sum(qa * qa, axis=1)
        k2 += tl.sum(k * k, axis=1)
    norm_a = tl.sqrt(s2)
    r_a = 1.0 / tl.maximum(norm_a, EPS, propagate_nan=tl.PropagateNan.ALL)
    norm_k = tl.sqrt(k2)
    r_k = 1.0 / tl.maximum(norm_k, EPS, propagate_nan=tl.PropagateNan.ALL)
    g = tl.load(g_ptr + b * used + m, mask=mmask, other=0.0).to(acc_dtype)
    w = tl.load(w_ptr + b * used + m, mask=mmask, other=0.0).to(acc_dtype)
    tl.store(gn_ptr + b * used + m, g * r_a * r_k, mask=mmask)
    tl.store(gs_ptr + b * used + m, tl.where(norm_a > EPS, -0.5 * g * w * r_a * r_a, 0.0), mask=mmask)
    tl.store(gw_ptr + b * used + m, g * w, mask=mmask)
    if b == 0:
        tl.store(rk_ptr + m, tl.where(norm_k > EPS, r_k * r_k, 0.0), mask=mmask)


@triton.jit
def coda_grad_keys_kernel(
    q_ptr, k_ptr, a_ptr, gn_ptr, gs_ptr, gw_ptr, rk_ptr, gk_ptr, ga_ptr,
    batch, key_dim, used, start, pool,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per (block of the M rows, tile of Dk): ∂A = (∂nᵀq)⊙K + 2A⊙(∂s2ᵀq²), ∂K = (∂nᵀq)⊙A − K·r_k²·Σ_b G·α (where
    ‖K‖ > ε), summing b in order; rows outside [start, used) of the M = ``pool`` rows are written as zeros. ∂n,
    ∂s2, G·α and the masked r_k² in the compute dtype (``gn_ptr``'s)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = (m >= start) & (m < used)
    dmask = d < key_dim
    acc_dtype = gn_ptr.dtype.element_ty
    acc_ak = tl.zeros((BLOCK_M, BLOCK_D), dtype=acc_dtype)
    acc_a2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=acc_dtype)
    key_sum = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    for b in range(0, batch):
        q = tl.load(q_ptr + b * key_dim + d, mask=dmask, other=0.0).to(acc_dtype)
        gn = tl.load(gn_ptr + b * used + m, mask=live, other=0.0)
        gs = tl.load(gs_ptr + b * used + m, mask=live, other=0.0)
        acc_ak += gn[:, None] * q[None, :]
        acc_a2 += gs[:, None] * (q * q)[None, :]
        key_sum += tl.load(gw_ptr + b * used + m, mask=live, other=0.0)
    tile = live[:, None] & dmask[None, :]
    offs = m[:, None] * key_dim + d[None, :]
    k = tl.load(k_ptr + offs, mask=tile, other=0.0).to(acc_dtype)
    a = tl.load(a_ptr + offs, mask=tile, other=0.0).to(acc_dtype)
    key_scale = tl.load(rk_ptr + m, mask=live, other=0.0) * key_sum
    grad_k = tl.where(tile, acc_ak * a - k * key_scale[:, None], 0.0)
    grad_a = tl.where(tile, acc_ak * k + 2.0 * a * acc_a2, 0.0)
    out = (m[:, None] < pool) & dmask[None, :]
    tl.store(gk_ptr + offs, grad_k.to(gk_ptr.dtype.element_ty), mask=out)
    tl.store(ga_ptr + offs, grad_a.to(ga_ptr.dtype.element_ty), mask=out)


@triton.jit
def coda_grad_query_kernel(
    q_ptr, k_ptr, a_ptr, gn_ptr, gs_ptr, gq_ptr,
    key_dim, used,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per (sample b, tile of Dk): ∂q = Σ_m ∂n·A⊙K + 2q ⊙ Σ_m ∂s2·A², m in order."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < key_dim
    acc_dtype = gn_ptr.dtype.element_ty
    acc_n = tl.zeros((BLOCK_D,), dtype=acc_dtype)
    acc_s = tl.zeros((BLOCK_D,), dtype=acc_dtype)
    for m in range(0, used):
        a = tl.load(a_ptr + m * key_dim + d, mask=dmask, other=0.0).to(acc_dtype)
        k = tl.load(k_ptr + m * key_dim + d, mask=dmask, other=0.0).to(acc_dtype)
        acc_n += tl.load(gn_ptr + b * used + m) * a * k
        acc_s += tl.load(gs_ptr + b * used + m) * a * a
    q = tl.load(q_ptr + b * key_dim + d, mask=dmask, other=0.0).to(acc_dtype)
    tl.store(gq_ptr + b * key_dim + d, (acc_n + 2.0 * q * acc_s).to(gq_ptr.dtype.element_ty), mask=dmask)
