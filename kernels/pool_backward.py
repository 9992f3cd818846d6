"""Triton backward kernels of the prompt pool (docs/behaviour.md §4.6). Every sum runs in a fixed order (no atomics),
so identical inputs give bit-identical gradients.

- ``grad_prompt_kernel``: grad prompt (M, Lp, D) = Σ over every (row b, slot j) with idx[b, j] = m of
  grad_out[b, j·Lp : (j+1)·Lp], summed in (b, j) order by tiles of a fixed size.
- ``pull_weight_kernel``: W (B, M) = grad similarity + (grad reduce_sim / B) · #{j: idx[b, j] = m}.
- ``grad_query_kernel`` / ``grad_keys_kernel``: grad of the normalised query / keys
  (W @ prompt_norm, Wᵀ @ x_embed_norm + one-hot(idx)ᵀ @ grad selected_key, + the direct output
  grads), then back through v · rsqrt(max(Σ v², eps)): r · (g − ⟨g, n⟩ n) (r · g when clamped).
- ``grad_x_kernel``: grad x_embed = token slice of grad_out + the query grad spread over the tokens
  (1/N or 2/N for the mean, to the first argmax for the max).
Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.
"""

import triton
import triton.language as tl

from .pool_forward import SQUARED_NORM_EPS, inv_norm


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr):
    """a (P, Q) @ b (Q, R): tl.dot in exact fp32 (no TF32), or a broadcast product for fp64."""
    if USE_DOT:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.sum(a[:, :, None] * b[None, :, :], 1)
    return out


@triton.jit
def grad_prompt_kernel(
    g_ptr, idx_ptr, gp_ptr, M, BK, K, TD, LPD,
    ACC64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Program (prompt block, e-block): gp[m, e] = Σ_{r = b·K + j, idx[r] = m} g[b, j·Lp·D + e].

    g (B, T, D) contiguous, idx (B·K,) flattened. Rows are summed by tiles of BLOCK_R in (b, j)
    order; a row is read only when some prompt of the block selected it.
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < LPD
    if ACC64:
        acc = tl.zeros((BLOCK_P, BLOCK_E), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_E), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, BK, BLOCK_R):
        r = r0 + offs_r
        ids = tl.load(idx_ptr + r, mask=r < BK, other=-1)
        hit = ids[None, :] == p[:, None]
        used = tl.max(hit.to(tl.int32), 0) > 0
        base = (r // K).to(tl.int64) * TD + (r % K) * LPD
        tile = tl.load(g_ptr + base[:, None] + e[None, :], mask=used[:, None] & emask[None, :], other=0.0)
        acc += tl.sum(tl.where(hit[:, :, None], tile.to(acc.dtype)[None, :, :], 0.0), 1)
    mask = (p < M)[:, None] & emask[None, :]
    tl.store(gp_ptr + p[:, None].to(tl.int64) * LPD + e[None, :], acc.to(gp_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pull_weight_kernel(
    gsim_ptr, grs_ptr, idx_ptr, w_ptr, B, M, K,
    HAS_GSIM: tl.constexpr, HAS_GRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program b: W[b, m] = gsim[b, m] + (grs / B) · #{j: idx[b, j] = m}."""
    CT: tl.constexpr = w_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        w = tl.zeros((BLOCK_M,), dtype=CT)
        if HAS_GSIM:
            w += tl.load(gsim_ptr + b * M + m, mask=m < M, other=0.0).to(CT)
        if HAS_GRS:
            count = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                ids = tl.load(idx_ptr + b * K + kk, mask=kk < K, other=-1)
                count += tl.sum((ids[:, None] == m[None, :]).to(tl.int32), 0)
            w += (tl.load(grs_ptr).to(CT) / B) * count.to(CT)
        tl.store(w_ptr + b * M + m, w, mask=m < M)


@triton.jit
def grad_query_kernel(
    gxn_ptr, w_ptr, pnorm_ptr, xn_ptr, qss_ptr, gq_ptr, B, M, D,
    HAS_GXN: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program over BLOCK_B rows: gq (B, D) = grad of the raw query; gq doubles as scratch for grad x_embed_norm."""
    CT: tl.constexpr = gq_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = rows < B
    rows = tl.where(bmask, rows, 0).to(tl.int64)  # masked rows alias row 0 for loads, never stored
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dots = tl.zeros((BLOCK_B,), dtype=CT)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        bd_mask = bmask[:, None] & (d < D)[None, :]
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=CT)
        if HAS_GXN:
            acc += tl.load(gxn_ptr + rows[:, None] * D + d[None, :], mask=bd_mask, other=0.0).to(CT)
        for m0 in range(0, M, BLOCK_M):
            m = m0 + offs_m
            w = tl.load(w_ptr + rows[:, None] * M + m[None, :], mask=bmask[:, None] & (m < M)[None, :], other=0.0)
            kn = tl.load(pnorm_ptr + m[:, None] * D + d[None, :], mask=(m < M)[:, None] & (d < D)[None, :], other=0.0)
            acc += _mm(w, kn, USE_DOT)
        tl.store(gq_ptr + rows[:, None] * D + d[None, :], acc, mask=bd_mask)
        xn = tl.load(xn_ptr + rows[:, None] * D + d[None, :], mask=bd_mask, other=0.0)
        dots += tl.sum(acc * xn, 1)
    tl.debug_barrier()
    ss = tl.load(qss_ptr + rows)
    r = inv_norm(ss)
    dots = tl.where(ss >= SQUARED_NORM_EPS, dots, 0.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        bd_mask = bmask[:, None] & (d < D)[None, :]
        g = tl.load(gq_ptr + rows[:, None] * D + d[None, :], mask=bd_mask, other=0.0)
        n = tl.load(xn_ptr + rows[:, None] * D + d[None, :], mask=bd_mask, other=0.0)
        tl.store(gq_ptr + rows[:, None] * D + d[None, :], r[:, None] * (g - dots[:, None] * n), mask=bd_mask)


@triton.jit
def grad_keys_kernel(
    gpn_ptr, w_ptr, xn_ptr, idx_ptr, gsel_ptr, pnorm_ptr, kss_ptr, scratch_ptr, gk_ptr, B, M, K, D,
    HAS_GPN: tl.constexpr, HAS_GSEL: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program over BLOCK_M keys: gk (M, D) = grad of the keys; scratch (M, D) holds grad prompt_norm."""
    CT: tl.constexpr = scratch_ptr.dtype.element_ty
    keys = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = keys < M
    keys = tl.where(mmask, keys, 0).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    dots = tl.zeros((BLOCK_M,), dtype=CT)
    total = B * K
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        dmask = d < D
        md_mask = mmask[:, None] & dmask[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=CT)
        if HAS_GPN:
            acc += tl.load(gpn_ptr + keys[:, None] * D + d[None, :], mask=md_mask, other=0.0).to(CT)
        for b0 in range(0, B, BLOCK_B):
            b = b0 + offs_b
            wt = tl.load(w_ptr + b[None, :] * M + keys[:, None], mask=mmask[:, None] & (b < B)[None, :], other=0.0)
            xn = tl.load(xn_ptr + b[:, None] * D + d[None, :], mask=(b < B)[:, None] & dmask[None, :], other=0.0)
            acc += _mm(wt, xn, USE_DOT)
        if HAS_GSEL:
            for r0 in range(0, total, BLOCK_R):
                r = r0 + offs_r
                ids = tl.load(idx_ptr + r, mask=r < total, other=-1)
                onehot = ((keys[:, None] == ids[None, :]) & mmask[:, None]).to(CT)
                rd_mask = (r < total)[:, None] & dmask[None, :]
                gs = tl.load(gsel_ptr + r[:, None].to(tl.int64) * D + d[None, :], mask=rd_mask, other=0.0).to(CT)
                acc += _mm(onehot, gs, USE_DOT)
        tl.store(scratch_ptr + keys[:, None] * D + d[None, :], acc, mask=md_mask)
        kn = tl.load(pnorm_ptr + keys[:, None] * D + d[None, :], mask=md_mask, other=0.0)
        dots += tl.sum(acc * kn, 1)
    tl.debug_barrier()
    ss = tl.load(kss_ptr + keys)
    r = inv_norm(ss)
    dots = tl.where(ss >= SQUARED_NORM_EPS, dots, 0.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        md_mask = mmask[:, None] & (d < D)[None, :]
        g = tl.load(scratch_ptr + keys[:, None] * D + d[None, :], mask=md_mask, other=0.0)
        n = tl.load(pnorm_ptr + keys[:, None] * D + d[None, :], mask=md_mask, other=0.0)
        out = r[:, None] * (g - dots[:, None] * n)
        tl.store(gk_ptr + keys[:, None] * D + d[None, :], out.to(gk_ptr.dtype.element_ty), mask=md_mask)


@triton.jit
def grad_x_kernel(
    g_ptr, gq_ptr, arg_ptr, gx_ptr, N, D, T, TOK0,
    QUERY: tl.constexpr, HAS_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, d-block): gx[b, n] = g[b, TOK0 + n] + gq[b]·w/N (w = 1 mean, 2 mean_max) + gq[b]·[n = argmax]."""
    CT: tl.constexpr = gq_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    gq = tl.load(gq_ptr + b * D + d, mask=dmask, other=0.0)
    if QUERY == 0:
        spread = gq / N
    elif QUERY == 2:
        spread = (gq * 2) / N
    else:
        spread = tl.zeros((BLOCK_D,), dtype=CT)
    if QUERY == 1 or QUERY == 2:
        argmax = tl.load(arg_ptr + b * D + d, mask=dmask, other=-1)
    else:
        argmax = tl.full((BLOCK_D,), -1, dtype=tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        mask = (n < N)[:, None] & dmask[None, :]
        if HAS_G:
            g = tl.load(g_ptr + b * T * D + (TOK0 + n)[:, None] * D + d[None, :], mask=mask, other=0.0).to(CT)
        else:
            g = tl.zeros((BLOCK_N, BLOCK_D), dtype=CT)
        g = g + spread[None, :]
        g = g + tl.where(n[:, None] == argmax[None, :], gq[None, :], 0.0)
        tl.store(gx_ptr + b * N * D + n[:, None] * D + d[None, :], g.to(gx_ptr.dtype.element_ty), mask=mask)
