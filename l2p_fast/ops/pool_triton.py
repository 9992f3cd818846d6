"""Host launchers of the pool's Triton kernels (device code: ``l2p_fast.kernels.pool_forward`` /
``pool_backward`` / ``tuned``): check, allocate, pick blocks, launch. The ops around them (schemas,
fakes, autograd) are in ``l2p_fast/ops/pool.py`` and, for the non-pool ``launch_prepend``,
``l2p_fast/ops/prepend.py``.

Block sizes depend on shapes only. Kernels whose bits depend on the block sizes (every reduction)
use fixed sizes, so a gradient is bit-identical in every process; only the element-wise kernels
(``prepend_kernel``, ``grad_x_kernel``) are autotuned, and only on a GPU (the interpreter has no
driver to time with). Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..modes import QUERY_FROM_CLS, compute_dtype, takes_token_max
from ..validation import validate_pool_op, validate_prepend_op
from .triton_launch import big_blocks, device_guard, kernels, pow2


def forward_blocks(n: int, d: int, m: int, k: int, lpd: int) -> dict[str, int]:
    if big_blocks():
        block_d = pow2(d, high=1024)
        block_e = pow2(lpd, high=1 << 16)
        return {
            "BLOCK_D": block_d,
            "BLOCK_N": pow2(n, high=max(16, (1 << 16) // block_d)),
            "BLOCK_M": pow2(m, high=1024),
            "BLOCK_S": pow2(k, low=1, high=max(1, (1 << 18) // block_e)),
            "BLOCK_E": block_e,
        }
    return kernels()[2].forward_blocks(n, d, m, k, lpd)  # the GPU table (l2p_fast/kernels/tuned.py)


def launch_pool_forward(
    x_embed: Tensor,
    prompt: Tensor,
    keys: Tensor,
    cls_features: Tensor | None,
    prompt_mask: Tensor | None,
    query_mode: int,
    top_k: int,
    batchwise: bool,
    frequency: Tensor | None = None,
    vote_counts: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Select + gather + prepend. x_embed (B, N, D), prompt (M, Lp, D), keys (M, D), cls_features (B, D)
    (used when query_mode is 3), prompt_mask (B, K') or None, frequency (M,) float (diversified selection)
    or None, vote_counts (M,) int (the batch vote's counts, given: the global vote) or None.

    Returns (prompt_norm (M, D), x_embed_norm (B, D), similarity (B, M), selected_key (B, K, D),
    reduce_sim (), prompted_embedding (B, K·Lp + N, D), idx (B, K) int64, key_sumsq (M,),
    query_sumsq (B,), argmax (B, D) int32 for the max queries, else (0,)).
    """
    validate_pool_op(x_embed, prompt, keys, cls_features, prompt_mask, query_mode, top_k, frequency, vote_counts)
    fwd = kernels()[0]
    batch, tokens, width = x_embed.shape
    pool_size, length, _ = prompt.shape
    k = prompt_mask.shape[1] if prompt_mask is not None else top_k
    ct = compute_dtype(x_embed.dtype, keys.dtype)
    prompt = prompt.contiguous()
    new = functools.partial(torch.empty, device=x_embed.device)
    idx = new((batch, k), dtype=torch.int64)
    prompt_norm = new((pool_size, width), dtype=ct)
    x_norm = new((batch, width), dtype=ct)
    similarity = new((batch, pool_size), dtype=ct)
    selected = new((batch, k, width), dtype=ct)
    pull = new((batch,), dtype=ct)
    out = new((batch, k * length + tokens, width), dtype=torch.promote_types(prompt.dtype, x_embed.dtype))
    key_sumsq = new((pool_size,), dtype=ct)
    query_sumsq = new((batch,), dtype=ct)
    argmax = new((batch, width) if takes_token_max(query_mode) else (0,), dtype=torch.int32)
    if batchwise and prompt_mask is None and vote_counts is not None:  # the global vote: the winners of the given
        winners = torch.sort(vote_counts, descending=True, stable=True).indices[:k]  # counts, by count then id,
        prompt_mask = winners.unsqueeze(0).expand(batch, k)  # enter as a mask (one sort of M ints, no sync)
    vote = batchwise and prompt_mask is None
    top = new((batch, k), dtype=torch.int64) if vote else idx
    cls = cls_features if query_mode == QUERY_FROM_CLS else x_embed[:, 0]
    mask = prompt_mask if prompt_mask is not None else idx
    freq = frequency.to(ct).contiguous() if frequency is not None else key_sumsq  # a stand-in pointer when unused
    blocks = forward_blocks(tokens, width, pool_size, k, length * width)
    with device_guard(x_embed):
        fwd.select_kernel[(batch,)](
            x_embed, *x_embed.stride(), cls, *cls.stride(), prompt, keys, *keys.stride(), mask, *mask.stride(), freq,
            top, prompt_norm, x_norm, similarity, selected, pull, out, key_sumsq, query_sumsq, argmax,
            tokens, width, pool_size, k, length,
            QUERY=query_mode, HAS_MASK=prompt_mask is not None, GATHER=not vote, COPY=True,
            HAS_FREQ=frequency is not None and prompt_mask is None, **blocks,
        )
        if vote:
            counts = new((batch, pool_size), dtype=torch.int32)
            fwd.vote_gather_kernel[(batch,)](
                top, counts, idx, prompt, keys, *keys.stride(), x_norm, selected, pull, out,
                batch, tokens, width, pool_size, k, length,
                BLOCK_M=blocks["BLOCK_M"], BLOCK_R=pow2(batch * k, high=1024 if big_blocks() else 64),
                BLOCK_D=blocks["BLOCK_D"], BLOCK_S=blocks["BLOCK_S"], BLOCK_E=blocks["BLOCK_E"],
                num_warps=blocks.get("num_warps", 4),
            )
    reduce_sim = pull.sum() / batch
    return prompt_norm, x_norm, similarity, selected, reduce_sim, out, idx, key_sumsq, query_sumsq, argmax


def launch_vote_counts(
    x_embed: Tensor, keys: Tensor, cls_features: Tensor | None, frequency: Tensor | None, query_mode: int, top_k: int
) -> Tensor:
    """The global vote's local half: counts (M,) int64 of the rows of x_embed (B, N, D) holding each prompt among
    their top-K (diversified by frequency (M,) when given). keys (M, D). ``select_kernel`` without the copy and
    the gather, then a fixed-size count."""
    pool_size = keys.shape[0]
    stand_in = keys.new_empty((pool_size, 1, keys.shape[1]))  # no prompt is read (no gather)
    validate_pool_op(x_embed, stand_in, keys, cls_features, None, query_mode, top_k, frequency, None)
    fwd = kernels()[0]
    batch, tokens, width = x_embed.shape
    ct = compute_dtype(x_embed.dtype, keys.dtype)
    new = functools.partial(torch.empty, device=x_embed.device)
    top = torch.zeros((batch, top_k), dtype=torch.int64, device=x_embed.device)  # every slot written; zeros: ids
    x_norm = new((batch, width), dtype=ct)  # in range even where the launch is only recorded (triton_resources)
    similarity = new((batch, pool_size), dtype=ct)
    prompt_norm = new((pool_size, width), dtype=ct)
    key_sumsq = new((pool_size,), dtype=ct)
    query_sumsq = new((batch,), dtype=ct)
    argmax = new((batch, width) if takes_token_max(query_mode) else (0,), dtype=torch.int32)
    cls = cls_features if query_mode == QUERY_FROM_CLS else x_embed[:, 0]
    freq = frequency.to(ct).contiguous() if frequency is not None else key_sumsq
    blocks = forward_blocks(tokens, width, pool_size, top_k, width)
    with device_guard(x_embed):
        fwd.select_kernel[(batch,)](
            x_embed, *x_embed.stride(), cls, *cls.stride(), stand_in, keys, *keys.stride(), top, *top.stride(), freq,
            top, prompt_norm, x_norm, similarity, x_norm, query_sumsq, x_norm, key_sumsq, query_sumsq, argmax,
            tokens, width, pool_size, top_k, 1,
            QUERY=query_mode, HAS_MASK=False, GATHER=False, COPY=False,
            HAS_FREQ=frequency is not None, **blocks,
        )
    counts = torch.zeros(pool_size, dtype=torch.int64, device=x_embed.device)
    return counts.scatter_add_(0, top.reshape(-1), torch.ones_like(top.reshape(-1)))


def launch_prepend(prompt: Tensor, x_embed: Tensor) -> Tensor:
    """Non-pool mode: cat(prompt (Lp, D) for every row, x_embed (B, N, D)) → (B, Lp + N, D)."""
    validate_prepend_op(prompt, x_embed)
    tuned = kernels()[2]
    batch, tokens, width = x_embed.shape
    length = prompt.shape[0]
    prompt = prompt.contiguous()
    out = torch.empty(
        (batch, length + tokens, width), device=x_embed.device, dtype=torch.promote_types(prompt.dtype, x_embed.dtype)
    )
    kernel = tuned.prepend_kernel
    meta = {} if tuned.AUTOTUNED else {"BLOCK_T": pow2(length + tokens, high=64),
                                       "BLOCK_D": pow2(width, high=1024 if big_blocks() else 64)}

    def grid(m: dict) -> tuple[int, int, int]:
        return (batch, -(-(length + tokens) // m["BLOCK_T"]), -(-width // m["BLOCK_D"]))

    with device_guard(x_embed):
        kernel[grid](prompt, x_embed, *x_embed.stride(), out, tokens, width, length, **meta)
    return out


def launch_grad_prompt(grad_out: Tensor, idx: Tensor, pool_size: int, length: int, dtype: torch.dtype) -> Tensor:
    """grad prompt (M, Lp, D) in ``dtype``: Σ of grad_out (B, K·Lp + N, D) rows over every slot holding id m."""
    bwd = kernels()[1]
    grad_out = grad_out.contiguous()
    batch, total, width = grad_out.shape
    k = idx.shape[1]
    lpd = length * width
    grad_prompt = torch.empty((pool_size, length, width), device=grad_out.device, dtype=dtype)
    if big_blocks():
        block_e = pow2(lpd, high=1 << 14)
        block_r = pow2(batch * k, high=max(16, (1 << 16) // block_e))
        block_p = pow2(pool_size, low=1, high=max(1, (1 << 20) // (block_r * block_e)))
    else:
        block_p, block_r, block_e = 1, 16, pow2(lpd, high=kernels()[2].GRAD_PROMPT_MAX_BLOCK_E)  # the GPU table
    with device_guard(grad_out):
        bwd.grad_prompt_kernel[(-(-pool_size // block_p), -(-lpd // block_e))](
            grad_out, idx.contiguous(), grad_prompt, pool_size, batch * k, k, total * width, lpd,
            ACC64=grad_out.dtype == torch.float64, BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_E=block_e,
        )
    return grad_prompt


def launch_grad_similarity(
    grad_prompt_norm: Tensor | None,
    grad_x_norm: Tensor | None,
    grad_similarity: Tensor | None,
    grad_selected: Tensor | None,
    grad_reduce_sim: Tensor | None,
    idx: Tensor,
    prompt_norm: Tensor,
    x_norm: Tensor,
    key_sumsq: Tensor,
    query_sumsq: Tensor,
    keys_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Grads of the keys (M, D) in ``keys_dtype`` and of the raw query (B, D) in the compute dtype.

    From the grads of prompt_norm (M, D), x_embed_norm (B, D), similarity (B, M), selected_key
    (B, K, D) and reduce_sim () (each may be None), through the pull term and the normalisation.
    """
    bwd = kernels()[1]
    batch, width = x_norm.shape
    pool_size = prompt_norm.shape[0]
    k = idx.shape[1]
    ct = x_norm.dtype
    idx = idx.contiguous()
    new = functools.partial(torch.empty, device=x_norm.device, dtype=ct)
    grads = [None if g is None else g.to(ct).contiguous() for g in (grad_prompt_norm, grad_x_norm, grad_similarity,
                                                                    grad_selected, grad_reduce_sim)]
    g_pn, g_xn, g_sim, g_sel, g_rs = grads
    weight = new((batch, pool_size))
    grad_query = new((batch, width))
    scratch = new((pool_size, width))
    grad_keys = torch.empty((pool_size, width), device=x_norm.device, dtype=keys_dtype)
    use_dot = ct == torch.float32
    if big_blocks():
        bb, bm, br = pow2(batch, high=256), pow2(pool_size, high=256), pow2(batch * k, high=256)
        bd = pow2(width, high=1024 if use_dot else 32)
    else:
        tuned = kernels()[2]  # the GPU table
        bb, bm, br, bd = 16, tuned.GRAD_BLOCK_M, 16, tuned.GRAD_BLOCK_D_DOT if use_dot else 16
    with device_guard(x_norm):
        bwd.pull_weight_kernel[(batch,)](
            g_sim if g_sim is not None else weight, g_rs if g_rs is not None else weight, idx, weight,
            batch, pool_size, k, HAS_GSIM=g_sim is not None, HAS_GRS=g_rs is not None,
            BLOCK_M=pow2(pool_size, high=1024 if big_blocks() else 128),
            BLOCK_K=pow2(k, high=64 if big_blocks() else 16),
        )
        bwd.grad_query_kernel[(-(-batch // bb),)](
            g_xn if g_xn is not None else grad_query, weight, prompt_norm, x_norm, query_sumsq, grad_query,
            batch, pool_size, width, HAS_GXN=g_xn is not None, USE_DOT=use_dot, BLOCK_B=bb, BLOCK_M=bm, BLOCK_D=bd,
        )
        bwd.grad_keys_kernel[(-(-pool_size // bm),)](
            g_pn if g_pn is not None else scratch, weight, x_norm, idx, g_sel if g_sel is not None else scratch,
            prompt_norm, key_sumsq, scratch, grad_keys, batch, pool_size, k, width,
            HAS_GPN=g_pn is not None, HAS_GSEL=g_sel is not None, USE_DOT=use_dot,
            BLOCK_M=bm, BLOCK_B=bb, BLOCK_R=br, BLOCK_D=bd,
        )
    return grad_keys, grad_query


def launch_grad_x(
    grad_out: Tensor | None, grad_query: Tensor, argmax: Tensor, query_mode: int, tokens: int, prompt_tokens: int,
    dtype: torch.dtype,
) -> Tensor:
    """grad x_embed (B, N, D) in ``dtype``: token slice of grad_out (B, K·Lp + N, D) + the query grad (B, D)
    spread by the token mean (query_mode 0, 2) and routed to the first argmax (B, D) (query_mode 1, 2)."""
    tuned = kernels()[2]
    batch, width = grad_query.shape
    grad_x = torch.empty((batch, tokens, width), device=grad_query.device, dtype=dtype)
    g = grad_out.contiguous() if grad_out is not None else grad_query
    total = prompt_tokens + tokens
    meta = {} if tuned.AUTOTUNED else {"BLOCK_N": pow2(tokens, high=256 if big_blocks() else 16),
                                       "BLOCK_D": pow2(width, high=1024 if big_blocks() else 64)}

    def grid(m: dict) -> tuple[int, int]:
        return (batch, -(-width // m["BLOCK_D"]))

    with device_guard(grad_query):
        tuned.grad_x_kernel[grid](
            g, grad_query, argmax, grad_x, tokens, width, total, prompt_tokens,
            QUERY=query_mode, HAS_G=grad_out is not None, **meta,
        )
    return grad_x
