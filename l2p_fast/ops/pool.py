"""The pool-mode forward (docs/behaviour.md §4): every backend's implementation, schema, fake and autograd.

- reference: ``l2p_fast.reference.pool_forward`` (plain PyTorch autograd).
- cpu / cuda: the fused native op ``l2p_fast::pool_forward`` and its backward op ``pool_backward``
  (schemas in ``csrc/bindings.cpp``, kernels in ``csrc/cpu/pool.cpp`` / ``csrc/cuda/pool.cu``, arithmetic
  in ``csrc/common/pool_math.h``, autograd node in C++: ``csrc/cpu/pool_autograd.cpp``); their fakes here.
- triton: the custom ops ``l2p_fast::triton_pool_forward`` (+ ``triton_grad_prompt``,
  ``triton_grad_similarity``, ``triton_grad_x`` for its backward), defined here; host launchers in
  ``l2p_fast/ops/pool_triton.py``, device code in ``kernels/pool_forward.py`` / ``pool_backward.py``.

Every implementation takes (x_embed (B, N, D), prompt (M, Lp, D), keys (M, D), *, embedding_key,
top_k, batchwise, cls_features (B, D) | None, prompt_mask (B, K') | None, frequency (M,) | None,
vote_counts (M,) | None) and returns the tensor outputs of §4.5 by name (``pool_outputs``).
``frequency`` diversifies the selection (docs/behaviour.md §8); ``vote_counts`` are the batch vote's
counts when given (the global vote, §9).

The op ``pool_vote_counts`` (x_embed, keys, *, embedding_key, top_k, cls_features, frequency) → counts (M,)
int64 is the vote's local half (§9): one op per backend (reference ``reference.pool_vote_counts``; native
``l2p_fast::pool_vote_counts``; Triton ``l2p_fast::triton_pool_vote_counts``), not differentiable.

Autograd, where the backends differ (and why it is harmless):
- An in-place edit of an *input* between forward and backward (e.g. an optimiser step on ``prompt_key``)
  raises in the reference wherever autograd saved that input (version check). The fused backends save
  only their own outputs (norms, ids, argmax, squared norms), never an input, so such an edit cannot
  change their gradients: they return the gradient of the forward that ran, and do not raise. An
  in-place edit of a saved *output* (``x_embed_norm``, ``prompt_norm``) raises on every backend.
- Gradients of inputs that no used output depends on are ``None`` on the reference and the native
  backend. Triton gives ``None`` too, except that when a loss uses only similarity outputs that reach
  one side (``selected_key`` / ``prompt_norm``: the keys only; ``x_embed_norm``: the query only) it
  returns a zero tensor for the other side; only an optimiser that treats ``None`` and zero differently
  (weight decay on a parameter without a gradient) can tell them apart.
- Forward-mode AD: reference only; the native and Triton backends raise a clear error naming
  ``backend='reference'``. Double backward: reference only (the fused backwards are differentiable once).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native, reference
from ..dispatch import register
from ..modes import QUERY_FROM_CLS, compute_dtype, query_mode, takes_token_max
from ..validation import ids_unchecked
from . import pool_triton
from .triton_launch import reject_forward_ad

register("pool_forward", "reference")(reference.pool_forward)
register("pool_vote_counts", "reference")(reference.pool_vote_counts)


def pool_outputs(
    idx: Tensor,
    prompt_norm: Tensor,
    x_norm: Tensor,
    similarity: Tensor,
    selected_key: Tensor,
    reduce_sim: Tensor,
    prompted: Tensor,
) -> dict[str, Tensor]:
    """The tensor outputs of §4.5 by name, in the module's order: idx (B, K), prompt_norm (M, D),
    x_norm (B, D), similarity (B, M), selected_key (B, K, D), reduce_sim (), prompted (B, K·Lp + N, D)."""
    return {
        "prompt_idx": idx,
        "prompt_norm": prompt_norm,
        "x_embed_norm": x_norm,
        "similarity": similarity,
        "selected_key": selected_key,
        "reduce_sim": reduce_sim,
        "prompted_embedding": prompted,
    }


# ---------------------------------------------------------------------------------------------
# native: l2p_fast::pool_forward / l2p_fast::pool_backward (C++ schemas, kernels and autograd)
# ---------------------------------------------------------------------------------------------
def _pool_forward_fake(x_embed, cls_features, prompt, keys, prompt_mask, mode, top_k, batchwise, frequency=None,
                       vote_counts=None):
    batch, tokens, width = x_embed.shape
    pool, length, _ = prompt.shape
    k = prompt_mask.shape[1] if prompt_mask is not None else top_k
    acc = compute_dtype(x_embed.dtype, keys.dtype)
    out = torch.promote_types(prompt.dtype, x_embed.dtype)
    new = x_embed.new_empty
    return (
        new((batch, k * length + tokens, width), dtype=out),
        new((batch, width), dtype=acc),
        new((pool, width), dtype=acc),
        new((batch, pool), dtype=acc),
        new((batch, k), dtype=torch.int64),
        new((batch, k, width), dtype=acc),
        new((), dtype=acc),
        new((batch, width) if takes_token_max(mode) else (0,), dtype=torch.int32),
        new((batch,), dtype=acc),
        new((pool,), dtype=acc),
    )


def _pool_backward_fake(grad_prompted, grad_x_embed_norm, grad_prompt_norm, grad_similarity, grad_selected_key,
                        grad_reduce_sim, x_embed_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax, mode, length,
                        x_dtype, query_dtype, prompt_dtype, keys_dtype, need_x, need_query, need_prompt, need_keys):
    batch, seq, width = grad_prompted.shape
    tokens = seq - idx.shape[1] * length
    pool = prompt_norm.shape[0]
    new = grad_prompted.new_empty
    return (
        new((batch, tokens, width) if need_x else (0,), dtype=x_dtype),
        new((batch, width) if need_query and mode == QUERY_FROM_CLS else (0,), dtype=query_dtype),
        new((pool, length, width) if need_prompt else (0,), dtype=prompt_dtype),
        new((pool, width) if need_keys else (0,), dtype=keys_dtype),
    )


def _vote_counts_fake(x_embed, cls_features, keys, frequency, mode, top_k):
    return x_embed.new_empty((keys.shape[0],), dtype=torch.int64)


if _native.has_op("pool_forward"):
    torch.library.register_fake("l2p_fast::pool_forward")(_pool_forward_fake)
    torch.library.register_fake("l2p_fast::pool_backward")(_pool_backward_fake)
if _native.has_op("pool_vote_counts"):
    torch.library.register_fake("l2p_fast::pool_vote_counts")(_vote_counts_fake)


@register("pool_forward", "cpu", "cuda")
def native_pool_forward(
    x_embed: Tensor,
    prompt: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    batchwise: bool,
    cls_features: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    frequency: Tensor | None = None,
    vote_counts: Tensor | None = None,
) -> dict[str, Tensor]:
    """Fused native pool forward (one C++ op; its autograd is a C++ node). Differentiable once in
    x_embed, cls_features, prompt and keys (not in frequency / vote_counts: they only pick ids)."""
    mode = query_mode(embedding_key, cls_features is not None)
    if prompt_mask is not None and ids_unchecked(prompt_mask):
        prompt_mask = prompt_mask.clamp(0, prompt.shape[0] - 1)
    cls = cls_features if mode == QUERY_FROM_CLS else None
    args = (x_embed, cls, prompt, keys, prompt_mask, mode, top_k, batchwise)
    if frequency is not None or vote_counts is not None:
        args += (frequency, vote_counts)
    # the overload itself: the packet's overload resolution costs ~3 µs a call
    prompted, x_norm, prompt_norm, similarity, idx, selected, reduce_sim = torch.ops.l2p_fast.pool_forward.default(
        *args
    )[:7]
    return pool_outputs(idx, prompt_norm, x_norm, similarity, selected, reduce_sim, prompted)


@register("pool_vote_counts", "cpu", "cuda")
def native_pool_vote_counts(
    x_embed: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    cls_features: Tensor | None = None,
    frequency: Tensor | None = None,
) -> Tensor:
    """counts (M,) int64 of the rows of x_embed (B, N, D) holding each prompt among their top-K (one C++ op)."""
    mode = query_mode(embedding_key, cls_features is not None)
    cls = cls_features.detach() if mode == QUERY_FROM_CLS else None
    return torch.ops.l2p_fast.pool_vote_counts.default(x_embed.detach(), cls, keys.detach(), frequency, mode, top_k)


# ---------------------------------------------------------------------------------------------
# triton: l2p_fast::triton_pool_forward and the ops of its backward
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "l2p_fast::triton_pool_forward",
    mutates_args=(),
    schema="(Tensor x_embed, Tensor prompt, Tensor keys, Tensor? cls_features, Tensor? prompt_mask, int query_mode, "
    "int top_k, bool batchwise, Tensor? frequency=None, Tensor? vote_counts=None) -> (Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def triton_pool_forward(
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
    """x_embed (B, N, D), prompt (M, Lp, D), keys (M, D) → (prompt_norm (M, D), x_embed_norm (B, D),
    similarity (B, M), selected_key (B, K, D), reduce_sim (), prompted_embedding (B, K·Lp + N, D),
    idx (B, K) int64, key_sumsq (M,), query_sumsq (B,), argmax (B, D) int32 or (0,)); K = prompt_mask.shape[1]
    or top_k. The last four outputs are not differentiable (the backward reads them). frequency (M,) and
    vote_counts (M,) only change which ids are picked (no gradient reaches them)."""
    return pool_triton.launch_pool_forward(
        x_embed, prompt, keys, cls_features, prompt_mask, query_mode, top_k, batchwise, frequency, vote_counts
    )


@triton_pool_forward.register_fake
def _triton_pool_forward_fake(x_embed, prompt, keys, cls_features, prompt_mask, query_mode, top_k, batchwise,
                              frequency=None, vote_counts=None):
    batch, tokens, width = x_embed.shape
    pool_size, length = prompt.shape[:2]
    k = prompt_mask.shape[1] if prompt_mask is not None else top_k
    ct = compute_dtype(x_embed.dtype, keys.dtype)
    new = x_embed.new_empty
    return (
        new((pool_size, width), dtype=ct),
        new((batch, width), dtype=ct),
        new((batch, pool_size), dtype=ct),
        new((batch, k, width), dtype=ct),
        new((), dtype=ct),
        new((batch, k * length + tokens, width), dtype=torch.promote_types(prompt.dtype, x_embed.dtype)),
        new((batch, k), dtype=torch.int64),
        new((pool_size,), dtype=ct),
        new((batch,), dtype=ct),
        new((batch, width) if takes_token_max(query_mode) else (0,), dtype=torch.int32),
    )


def _triton_pool_forward_setup(ctx, inputs, output) -> None:
    x_embed, prompt, keys, cls_features, _mask, mode, _top_k, _batchwise = inputs[:8]
    prompt_norm, x_norm, _, _, _, _, idx, key_sumsq, query_sumsq, argmax = output
    ctx.mark_non_differentiable(idx, key_sumsq, query_sumsq, argmax)
    ctx.set_materialize_grads(False)  # unused outputs cost nothing in the backward
    ctx.save_for_backward(idx, prompt_norm, x_norm, key_sumsq, query_sumsq, argmax)
    ctx.query_mode = mode
    ctx.x_dtype, ctx.tokens = x_embed.dtype, x_embed.shape[1]
    ctx.pool_size, ctx.length, ctx.prompt_dtype = prompt.shape[0], prompt.shape[1], prompt.dtype
    ctx.keys_dtype = keys.dtype
    ctx.cls_dtype = None if cls_features is None else cls_features.dtype


def _triton_pool_forward_backward(ctx, g_pn, g_xn, g_sim, g_sel, g_rs, g_out, *_non_differentiable):
    idx, prompt_norm, x_norm, key_sumsq, query_sumsq, argmax = ctx.saved_tensors
    need_x, need_prompt, need_keys, need_cls = ctx.needs_input_grad[:4]
    prompt_tokens = idx.shape[1] * ctx.length
    grad_prompt = None
    if need_prompt and g_out is not None:
        grad_prompt = triton_grad_prompt(g_out, idx, ctx.pool_size, ctx.length, ctx.prompt_dtype)
    grad_keys = grad_query = None
    similarity_grads = (g_pn, g_xn, g_sim, g_sel, g_rs)
    if any(g is not None for g in similarity_grads) and (need_keys or need_x or need_cls):
        grad_keys, grad_query = triton_grad_similarity(
            *similarity_grads, idx, prompt_norm, x_norm, key_sumsq, query_sumsq, ctx.keys_dtype
        )
    grad_x = grad_cls = None
    if ctx.query_mode == QUERY_FROM_CLS:
        grad_cls = None if grad_query is None or not need_cls else grad_query.to(ctx.cls_dtype)
        grad_query = None  # the tokens only receive the token slice
    if need_x and grad_query is not None:
        grad_x = triton_grad_x(g_out, grad_query, argmax, ctx.query_mode, ctx.tokens, prompt_tokens, ctx.x_dtype)
    elif need_x and g_out is not None:
        grad_x = g_out[:, prompt_tokens:].to(ctx.x_dtype)  # a view when the dtypes match: no copy
    return grad_x, grad_prompt, grad_keys if need_keys else None, grad_cls, None, None, None, None, None, None


triton_pool_forward.register_autograd(_triton_pool_forward_backward, setup_context=_triton_pool_forward_setup)


@torch.library.custom_op(
    "l2p_fast::triton_pool_vote_counts",
    mutates_args=(),
    schema="(Tensor x_embed, Tensor keys, Tensor? cls_features, Tensor? frequency, int query_mode, "
    "int top_k) -> Tensor",
)
def triton_pool_vote_counts(
    x_embed: Tensor, keys: Tensor, cls_features: Tensor | None, frequency: Tensor | None, query_mode: int, top_k: int
) -> Tensor:
    """counts (M,) int64 of the rows of x_embed (B, N, D) holding each prompt among their top-K (§9)."""
    return pool_triton.launch_vote_counts(x_embed, keys, cls_features, frequency, query_mode, top_k)


@triton_pool_vote_counts.register_fake
def _triton_pool_vote_counts_fake(x_embed, keys, cls_features, frequency, query_mode, top_k):
    return x_embed.new_empty((keys.shape[0],), dtype=torch.int64)


@register("pool_vote_counts", "triton")
def triton_vote_counts(
    x_embed: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    cls_features: Tensor | None = None,
    frequency: Tensor | None = None,
) -> Tensor:
    """The vote's local half by one Triton op (see ``reference.pool_vote_counts``)."""
    mode = query_mode(embedding_key, cls_features is not None)
    cls = cls_features.detach() if mode == QUERY_FROM_CLS else None
    return triton_pool_vote_counts(x_embed.detach(), keys.detach(), cls, frequency, mode, top_k)


@torch.library.custom_op(
    "l2p_fast::triton_grad_prompt",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor idx, int pool_size, int length, ScalarType dtype) -> Tensor",
)
def triton_grad_prompt(grad_out: Tensor, idx: Tensor, pool_size: int, length: int, dtype: torch.dtype) -> Tensor:
    """grad prompt (M, Lp, D): Σ of grad_out (B, K·Lp + N, D) slot rows over every (b, j) with idx[b, j] = m."""
    return pool_triton.launch_grad_prompt(grad_out, idx, pool_size, length, dtype)


@triton_grad_prompt.register_fake
def _triton_grad_prompt_fake(grad_out, idx, pool_size, length, dtype):
    return grad_out.new_empty((pool_size, length, grad_out.shape[2]), dtype=dtype)


@torch.library.custom_op(
    "l2p_fast::triton_grad_similarity",
    mutates_args=(),
    schema="(Tensor? grad_prompt_norm, Tensor? grad_x_norm, Tensor? grad_similarity, Tensor? grad_selected, "
    "Tensor? grad_reduce_sim, Tensor idx, Tensor prompt_norm, Tensor x_norm, Tensor key_sumsq, "
    "Tensor query_sumsq, ScalarType keys_dtype) -> (Tensor, Tensor)",
)
def triton_grad_similarity(
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
    """(grad keys (M, D) in keys_dtype, grad of the raw query (B, D) in ct) through the pull term and l2n."""
    return pool_triton.launch_grad_similarity(
        grad_prompt_norm, grad_x_norm, grad_similarity, grad_selected, grad_reduce_sim, idx, prompt_norm, x_norm,
        key_sumsq, query_sumsq, keys_dtype,
    )


@triton_grad_similarity.register_fake
def _triton_grad_similarity_fake(g_pn, g_xn, g_sim, g_sel, g_rs, idx, prompt_norm, x_norm, kss, qss, keys_dtype):
    return prompt_norm.new_empty(prompt_norm.shape, dtype=keys_dtype), torch.empty_like(x_norm)


@torch.library.custom_op(
    "l2p_fast::triton_grad_x",
    mutates_args=(),
    schema="(Tensor? grad_out, Tensor grad_query, Tensor argmax, int query_mode, int tokens, int prompt_tokens, "
    "ScalarType dtype) -> Tensor",
)
def triton_grad_x(
    grad_out: Tensor | None,
    grad_query: Tensor,
    argmax: Tensor,
    query_mode: int,
    tokens: int,
    prompt_tokens: int,
    dtype: torch.dtype,
) -> Tensor:
    """grad x_embed (B, N, D): token slice of grad_out + grad_query (B, D) through the mean / first argmax."""
    return pool_triton.launch_grad_x(grad_out, grad_query, argmax, query_mode, tokens, prompt_tokens, dtype)


@triton_grad_x.register_fake
def _triton_grad_x_fake(grad_out, grad_query, argmax, query_mode, tokens, prompt_tokens, dtype):
    return grad_query.new_empty((grad_query.shape[0], tokens, grad_query.shape[1]), dtype=dtype)


@register("pool_forward", "triton")
def triton_pool(
    x_embed: Tensor,
    prompt: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    batchwise: bool,
    cls_features: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    frequency: Tensor | None = None,
    vote_counts: Tensor | None = None,
) -> dict[str, Tensor]:
    """Pool-mode forward by the Triton ops: every tensor output of §4.5 (see ``reference.pool_forward``)."""
    mode = query_mode(embedding_key, cls_features is not None)
    if mode != QUERY_FROM_CLS:
        cls_features = None
    reject_forward_ad("prompt pool", x_embed, prompt, keys, cls_features)
    if prompt_mask is not None and ids_unchecked(prompt_mask):
        prompt_mask = prompt_mask.clamp(0, prompt.shape[0] - 1)
    prompt_norm, x_norm, similarity, selected, reduce_sim, out, idx = triton_pool_forward(
        x_embed, prompt, keys, cls_features, prompt_mask, mode, top_k, batchwise, frequency, vote_counts
    )[:7]
    return pool_outputs(idx, prompt_norm, x_norm, similarity, selected, reduce_sim, out)
