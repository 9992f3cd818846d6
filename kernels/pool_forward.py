"""Triton forward kernels of the prompt pool (docs/behaviour.md §4): select, batch vote, gather + prepend.

One program per batch row. ``select_kernel`` reads the row's tokens once — copying them into the
token slice of the output while reducing them to the query — normalises the query and the keys,
scores (B, M) in the compute dtype (fp32, or fp64 for fp64 inputs), picks the top-K by a rank count
(rank(m) = #{j: s_j > s_m or (s_j == s_m and j < m)}; selected iff rank < K, slot = rank: the lower
id wins ties) and, in per-sample mode, gathers the selected prompts into the output in the same
launch. With the batch vote, ``vote_gather_kernel`` counts the per-row top-K ids over the M ids,
ranks the counts the same way (more votes first, lower id first) and gathers. Given vote counts (the
global vote, docs/behaviour.md §9) are ranked by one device sort in the launcher and enter as a mask.
With frequencies (the diversified selection, §8) the rank count compares the penalised score
−max(1 − s, 0)·h first, then the similarity. No host sync, fixed output shapes.
Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.
"""

import triton
import triton.language as tl

# A module-level constant read inside @triton.jit code must be a tl.constexpr *instance*: the GPU
# compiler rejects a plain float global (an annotation alone is not enough; the interpreter accepts both).
SQUARED_NORM_EPS = tl.constexpr(1e-12)


@triton.jit
def inv_norm(sumsq):
    """rsqrt(max(Σ v², 1e-12)): the clamp is on the squared norm (docs/behaviour.md §4.2); a NaN sum stays NaN, as
    torch.clamp_min does (tl.maximum alone would return the eps, on the GPU and in the interpreter)."""
    return 1.0 / tl.sqrt(tl.maximum(sumsq, SQUARED_NORM_EPS, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _copy_tokens_and_reduce(
    x_row, sxn, sxd, out_row, cls_row, scd, q_row, argmax_row, N, D,
    QUERY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CT: tl.constexpr, COPY: tl.constexpr,
):
    """Copy x (N, D) into out (N, D) (if COPY) and write the raw query (D,) to q_row; return Σ q²."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qss = tl.zeros((BLOCK_D,), dtype=CT)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        dmask = d < D
        acc_sum = tl.zeros((BLOCK_D,), dtype=CT)
        acc_max = tl.full((BLOCK_D,), float("-inf"), dtype=CT)
        acc_arg = tl.zeros((BLOCK_D,), dtype=tl.int32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs_n
            mask = (n < N)[:, None] & dmask[None, :]
            tile = tl.load(x_row + n[:, None] * sxn + d[None, :] * sxd, mask=mask, other=0.0)
            if COPY:
                tl.store(out_row + n[:, None] * D + d[None, :], tile.to(out_row.dtype.element_ty), mask=mask)
            if QUERY != 3:
                tf = tile.to(CT)
                if QUERY != 1:
                    acc_sum += tl.sum(tf, 0)
                if QUERY != 0:
                    # as torch.max: the first NaN wins over every number, else the first maximum. NaN is
                    # handled apart: tl.max's NaN behaviour differs between the GPU and the interpreter.
                    isnan = (tf != tf) & mask
                    nan_arg = tl.min(tl.where(isnan, n[:, None], 2147483647), 0)
                    tile_nan = nan_arg < 2147483647
                    number = mask & (tf == tf)
                    tmax = tl.where(number, tf, float("-inf"))
                    bmax = tl.max(tmax, 0)
                    barg = tl.min(tl.where((tmax == bmax[None, :]) & number, n[:, None], 2147483647), 0)
                    kept_nan = acc_max != acc_max
                    take_nan = tile_nan & ~kept_nan
                    better = (bmax > acc_max) & ~kept_nan & ~tile_nan  # strict: the first maximum wins
                    acc_max = tl.where(take_nan, float("nan"), tl.where(better, bmax, acc_max))
                    acc_arg = tl.where(take_nan, nan_arg, tl.where(better, barg, acc_arg))
        if QUERY == 3:
            q = tl.load(cls_row + d * scd, mask=dmask, other=0.0).to(CT)
        elif QUERY == 0:
            q = acc_sum / N
        elif QUERY == 1:
            q = acc_max
        else:
            q = acc_max + 2 * (acc_sum / N)
        q = tl.where(dmask, q, 0.0)
        if QUERY == 1 or QUERY == 2:
            tl.store(argmax_row + d, acc_arg, mask=dmask)
        tl.store(q_row + d, q, mask=dmask)
        qss += q * q
    return tl.sum(qss, 0)


@triton.jit
def _rank_select(score_row, freq_ptr, idx_row, M, K, BLOCK_M: tl.constexpr, HAS_FREQ: tl.constexpr):
    """idx_row[rank(m)] = m for every m of rank < K, rank by descending score, ties → lower id.

    NaN ranks above every number (the order of torch.topk / torch.sort(descending=True)), NaNs among
    themselves by id, so the ranks are a permutation of 0…M−1 and every slot of idx_row is written.
    HAS_FREQ (the diversified selection): the penalised score p = −max(1 − s, 0)·freq ranks first (NaN
    first, NaNs by id), equal p by the score as above.
    """
    offs = tl.arange(0, BLOCK_M)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs
        mmask = m < M
        s_m = tl.load(score_row + m, mask=mmask, other=0)
        if HAS_FREQ:
            dist_m = 1.0 - s_m
            p_m = -(tl.where(dist_m < 0, 0.0, dist_m) * tl.load(freq_ptr + m, mask=mmask, other=0))
        rank = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for j0 in range(0, M, BLOCK_M):
            j = j0 + offs
            s_j = tl.load(score_row + j, mask=j < M, other=0)
            j_nan = (s_j != s_j)[None, :]
            m_nan = (s_m != s_m)[:, None]
            lower = j[None, :] < m[:, None]
            numbers = (s_j[None, :] > s_m[:, None]) | ((s_j[None, :] == s_m[:, None]) & lower)
            beats = tl.where(j_nan | m_nan, j_nan & (~m_nan | lower), numbers)
            if HAS_FREQ:
                dist_j = 1.0 - s_j
                p_j = -(tl.where(dist_j < 0, 0.0, dist_j) * tl.load(freq_ptr + j, mask=j < M, other=0))
                pj_nan = (p_j != p_j)[None, :]
                pm_nan = (p_m != p_m)[:, None]
                by_p = tl.where(p_j[None, :] == p_m[:, None], beats, p_j[None, :] > p_m[:, None])
                beats = tl.where(pj_nan | pm_nan, pj_nan & (~pm_nan | lower), by_p)
            beats = beats & (j < M)[None, :]
            rank += tl.sum(beats.to(tl.int32), 1)
        tl.store(idx_row + rank, m.to(tl.int64), mask=mmask & (rank < K))


@triton.jit
def _gather_row(
    idx_row, prompt_ptr, keys_ptr, skm, skd, xn_row, sel_row, out_row, M, K, D, LPD,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, CT: tl.constexpr,
):
    """Copy prompt[idx[j]] (Lp·D) into out rows j·Lp…, write selected_key[j]; return Σ_j ⟨key_j, xn⟩.

    The key rows are normalised by tiles of BLOCK_M rows with the same code as ``prompt_norm``, so
    selected_key is a bit-exact copy of prompt_norm[idx]. No helper calls inside loops (each costs
    the interpreter milliseconds).
    """
    offs_s = tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    for s0 in range(0, K, BLOCK_S):
        j = s0 + offs_s
        jmask = j < K
        ids = tl.load(idx_row + j, mask=jmask, other=0)
        ids = tl.minimum(tl.maximum(ids, 0), M - 1)  # never read out of bounds, whatever the ids
        for e0 in range(0, LPD, BLOCK_E):
            e = e0 + offs_e
            mask = jmask[:, None] & (e < LPD)[None, :]
            v = tl.load(prompt_ptr + ids[:, None] * LPD + e[None, :], mask=mask, other=0.0)
            tl.store(out_row + j[:, None] * LPD + e[None, :], v.to(out_row.dtype.element_ty), mask=mask)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pull = tl.zeros((BLOCK_M,), dtype=CT)
    for s0 in range(0, K, BLOCK_M):
        j = s0 + offs_m
        jmask = j < K
        ids = tl.load(idx_row + j, mask=jmask, other=0)
        ids = tl.minimum(tl.maximum(ids, 0), M - 1)
        kss = tl.zeros((BLOCK_M,), dtype=CT)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            k = tl.load(keys_ptr + ids[:, None] * skm + d[None, :] * skd, mask=jmask[:, None] & (d < D)[None, :],
                        other=0.0).to(CT)
            kss += tl.sum(k * k, 1)
        r = 1.0 / tl.sqrt(tl.maximum(kss, SQUARED_NORM_EPS, propagate_nan=tl.PropagateNan.ALL))
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            mask = jmask[:, None] & (d < D)[None, :]
            kn = tl.load(keys_ptr + ids[:, None] * skm + d[None, :] * skd, mask=mask, other=0.0).to(CT) * r[:, None]
            tl.store(sel_row + j[:, None] * D + d[None, :], kn, mask=mask)
            xn = tl.load(xn_row + d, mask=d < D, other=0.0)
            pull += tl.sum(kn * xn[None, :], 1)
    return tl.sum(pull, 0)


@triton.jit
def select_kernel(
    x_ptr, sxb, sxn, sxd, cls_ptr, scb, scd, prompt_ptr, keys_ptr, skm, skd, mask_ptr, smb, smk, freq_ptr,
    idx_ptr, pnorm_ptr, xn_ptr, sim_ptr, sel_ptr, pull_ptr, out_ptr, kss_ptr, qss_ptr, argmax_ptr,
    N, D, M, K, LP,
    QUERY: tl.constexpr, HAS_MASK: tl.constexpr, GATHER: tl.constexpr, COPY: tl.constexpr, HAS_FREQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Program b: tokens → out (if COPY) and query; normalise; similarity row; top-K (diversified by freq_ptr (M,)
    if HAS_FREQ) or mask → idx; gather if GATHER.

    QUERY: 0 mean, 1 max, 2 max + 2·mean, 3 cls_features. idx_ptr (B, K) gets the per-row top-K
    (the batch vote then overwrites it in ``vote_gather_kernel``). pull_ptr (B,): Σ_k ⟨key, xn⟩.
    """
    CT: tl.constexpr = sim_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    LPD = LP * D
    T = K * LP + N
    out_row = out_ptr + b * T * D
    xn_row = xn_ptr + b * D
    qss = _copy_tokens_and_reduce(
        x_ptr + b * sxb, sxn, sxd, out_row + K * LPD, cls_ptr + b * scb, scd, xn_row, argmax_ptr + b * D, N, D,
        QUERY, BLOCK_N, BLOCK_D, CT, COPY,
    )
    tl.store(qss_ptr + b, qss)
    rq = inv_norm(qss)
    offs_d = tl.arange(0, BLOCK_D)
    tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):  # normalise the query in place
        d = d0 + offs_d
        q = tl.load(xn_row + d, mask=d < D, other=0.0)
        tl.store(xn_row + d, q * rq, mask=d < D)
    tl.debug_barrier()
    # similarity row: (Σ_d xn_d k_md) · rsqrt(max(Σ_d k_md², eps))
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        mmask = m < M
        dot = tl.zeros((BLOCK_M,), dtype=CT)
        kss = tl.zeros((BLOCK_M,), dtype=CT)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            dmask = d < D
            xn = tl.load(xn_row + d, mask=dmask, other=0.0)
            k = tl.load(keys_ptr + m[:, None] * skm + d[None, :] * skd, mask=mmask[:, None] & dmask[None, :], other=0.0)
            k = k.to(CT)
            dot += tl.sum(k * xn[None, :], 1)
            kss += tl.sum(k * k, 1)
        rk = 1.0 / tl.sqrt(tl.maximum(kss, SQUARED_NORM_EPS, propagate_nan=tl.PropagateNan.ALL))
        tl.store(sim_ptr + b * M + m, dot * rk, mask=mmask)
    # prompt_norm: tiles of BLOCK_M rows shared out among the programs (same code as in _gather_row)
    for m0 in range(tl.program_id(0) * BLOCK_M, M, nprog * BLOCK_M):
        m = m0 + offs_m
        mmask = m < M
        kss = tl.zeros((BLOCK_M,), dtype=CT)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            k = tl.load(keys_ptr + m[:, None] * skm + d[None, :] * skd, mask=mmask[:, None] & (d < D)[None, :],
                        other=0.0).to(CT)
            kss += tl.sum(k * k, 1)
        tl.store(kss_ptr + m, kss, mask=mmask)
        r = 1.0 / tl.sqrt(tl.maximum(kss, SQUARED_NORM_EPS, propagate_nan=tl.PropagateNan.ALL))
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            mask = mmask[:, None] & (d < D)[None, :]
            kn = tl.load(keys_ptr + m[:, None] * skm + d[None, :] * skd, mask=mask, other=0.0).to(CT) * r[:, None]
            tl.store(pnorm_ptr + m[:, None] * D + d[None, :], kn, mask=mask)
    idx_row = idx_ptr + b * K
    if HAS_MASK:
        for k0 in range(0, K, BLOCK_M):
            kk = k0 + offs_m
            ids = tl.load(mask_ptr + b * smb + kk * smk, mask=kk < K, other=0).to(tl.int64)
            ids = tl.minimum(tl.maximum(ids, 0), M - 1)  # out-of-range ids are clamped, as in every backend
            tl.store(idx_row + kk, ids, mask=kk < K)
    else:
        tl.debug_barrier()
        _rank_select(sim_ptr + b * M, freq_ptr, idx_row, M, K, BLOCK_M, HAS_FREQ)
    if GATHER:
        tl.debug_barrier()
        pull = _gather_row(
            idx_row, prompt_ptr, keys_ptr, skm, skd, xn_row, sel_ptr + b * K * D, out_row, M, K, D, LPD,
            BLOCK_M, BLOCK_D, BLOCK_S, BLOCK_E, CT,
        )
        tl.store(pull_ptr + b, pull)


@triton.jit
def vote_gather_kernel(
    top_ptr, counts_ptr, idx_ptr, prompt_ptr, keys_ptr, skm, skd, xn_ptr, sel_ptr, pull_ptr, out_ptr,
    B, N, D, M, K, LP,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Program b: count the per-row top-K ids top (B, K) over M ids, rank them, gather row b.

    counts_ptr (B, M) int32 is private scratch (row b belongs to program b), so every program
    derives the same winners with no cross-program communication.
    """
    CT: tl.constexpr = xn_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    counts_row = counts_ptr + b * M
    total = B * K
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        c = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for r0 in range(0, total, BLOCK_R):
            r = r0 + offs_r
            ids = tl.load(top_ptr + r, mask=r < total, other=-1)
            c += tl.sum((ids[None, :] == m[:, None]).to(tl.int32), 1)
        tl.store(counts_row + m, c, mask=m < M)
    tl.debug_barrier()
    idx_row = idx_ptr + b * K
    _rank_select(counts_row, counts_row, idx_row, M, K, BLOCK_M, False)
    tl.debug_barrier()
    T = K * LP + N
    pull = _gather_row(
        idx_row, prompt_ptr, keys_ptr, skm, skd, xn_ptr + b * D, sel_ptr + b * K * D, out_ptr + b * T * D,
        M, K, D, LP * D, BLOCK_M, BLOCK_D, BLOCK_S, BLOCK_E, CT,
    )
    tl.store(pull_ptr + b, pull)


@triton.jit
def prepend_kernel(prompt_ptr, x_ptr, sxb, sxn, sxd, out_ptr, N, D, LP, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Non-pool mode, program (b, token block, width block): out[b] = cat(prompt (Lp, D), x[b] (N, D))."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = (d < D)[None, :]
    is_prompt = (t < LP)[:, None] & dmask
    is_token = ((t >= LP) & (t < LP + N))[:, None] & dmask
    p = tl.load(prompt_ptr + t[:, None] * D + d[None, :], mask=is_prompt, other=0.0)
    x = tl.load(x_ptr + b * sxb + (t - LP)[:, None] * sxn + d[None, :] * sxd, mask=is_token, other=0.0)
    v = tl.where(is_prompt, p.to(out_ptr.dtype.element_ty), x.to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + b * (LP + N) * D + t[:, None] * D + d[None, :], v, mask=is_prompt | is_token)
