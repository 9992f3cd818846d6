"""Every torch.library op of l2p_fast: schemas, fake (meta) kernels and autograd, in one place.

Native ops (``torch.ops.l2p_fast.*``) have their schemas in ``csrc/bindings.cpp`` and their CPU and
CUDA kernels in ``csrc/``; their fakes and autograd are registered here when the extension is
built. Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native

QUERY_MODES = {"mean": 0, "max": 1, "mean_max": 2}


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pool_outputs(
    idx: Tensor,
    prompt_norm: Tensor,
    x_norm: Tensor,
    similarity: Tensor,
    selected_key: Tensor,
    reduce_sim: Tensor,
    prompted: Tensor,
) -> dict[str, Tensor]:
    """The tensor outputs of SPEC §4.5 by name, in the module's order: idx (B, K), prompt_norm (M, D),
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
# l2p_fast::query_reduce(Tensor x, int mode) -> (Tensor q, Tensor argmax)      [native]
# x (B, N, D) → q (B, D) in max(x.dtype, fp32); argmax (B, D) int64 (empty for mode 0).
# ---------------------------------------------------------------------------------------------
def _query_reduce_fake(x: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    q = x.new_empty((x.shape[0], x.shape[2]), dtype=_accumulate_dtype(x.dtype))
    argmax_shape = (0, 0) if mode == 0 else (x.shape[0], x.shape[2])
    return q, x.new_empty(argmax_shape, dtype=torch.int64)


def _query_reduce_setup(ctx, inputs, output) -> None:
    x, mode = inputs
    ctx.mode = mode
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(output[1])


def _query_reduce_backward(ctx, grad_q: Tensor, _grad_argmax: Tensor) -> tuple[Tensor, None]:
    (argmax,) = ctx.saved_tensors
    batch, tokens, width = ctx.x_shape
    mean_weight = {0: 1.0, 1: 0.0, 2: 2.0}[ctx.mode] / tokens
    grad_x = (grad_q * mean_weight).unsqueeze(1).expand(batch, tokens, width).clone()
    if ctx.mode != 0:
        grad_x.scatter_add_(1, argmax.unsqueeze(1), grad_q.unsqueeze(1))
    return grad_x.to(ctx.x_dtype), None


def query_reduce(x: Tensor, embedding_key: str) -> Tensor:
    """Native query reduction: x (B, N, D) → (B, D) in max(x.dtype, fp32); differentiable."""
    return torch.ops.l2p_fast.query_reduce(x, QUERY_MODES[embedding_key])[0]


if _native.is_built():
    torch.library.register_fake("l2p_fast::query_reduce")(_query_reduce_fake)
    torch.library.register_autograd(
        "l2p_fast::query_reduce", _query_reduce_backward, setup_context=_query_reduce_setup
    )


# ---------------------------------------------------------------------------------------------
# Triton ops (kernels in kernels/, host launchers in l2p_fast/backends/triton.py, imported lazily
# so that TRITON_INTERPRET can still be set after l2p_fast is imported). query_mode: 0 mean,
# 1 max, 2 max + 2·mean, 3 cls_features. ct = compute dtype (fp32, fp64 for fp64 inputs).
# ---------------------------------------------------------------------------------------------
def _triton_launchers():
    from .backends import triton as launchers

    return launchers


def _triton_ct(x_dtype: torch.dtype, key_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x_dtype, key_dtype), torch.float32)


@torch.library.custom_op(
    "l2p_fast::triton_pool_forward",
    mutates_args=(),
    schema="(Tensor x_embed, Tensor prompt, Tensor keys, Tensor? cls_features, Tensor? prompt_mask, int query_mode, "
    "int top_k, bool batchwise) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
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
) -> tuple[Tensor, ...]:
    """x_embed (B, N, D), prompt (M, Lp, D), keys (M, D) → (prompt_norm (M, D), x_embed_norm (B, D),
    similarity (B, M), selected_key (B, K, D), reduce_sim (), prompted_embedding (B, K·Lp + N, D),
    idx (B, K) int64, key_sumsq (M,), query_sumsq (B,), argmax (B, D) int32 or (0,)); K = prompt_mask.shape[1]
    or top_k. The last four outputs are not differentiable (the backward reads them)."""
    return _triton_launchers().launch_pool_forward(
        x_embed, prompt, keys, cls_features, prompt_mask, query_mode, top_k, batchwise
    )


@triton_pool_forward.register_fake
def _triton_pool_forward_fake(x_embed, prompt, keys, cls_features, prompt_mask, query_mode, top_k, batchwise):
    batch, tokens, width = x_embed.shape
    pool_size, length = prompt.shape[:2]
    k = prompt_mask.shape[1] if prompt_mask is not None else top_k
    ct = _triton_ct(x_embed.dtype, keys.dtype)
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
        new((batch, width) if query_mode in (1, 2) else (0,), dtype=torch.int32),
    )


def _triton_pool_forward_setup(ctx, inputs, output) -> None:
    x_embed, prompt, keys, cls_features, _mask, query_mode, _top_k, _batchwise = inputs
    prompt_norm, x_norm, _, _, _, _, idx, key_sumsq, query_sumsq, argmax = output
    ctx.mark_non_differentiable(idx, key_sumsq, query_sumsq, argmax)
    ctx.set_materialize_grads(False)  # unused outputs cost nothing in the backward
    ctx.save_for_backward(idx, prompt_norm, x_norm, key_sumsq, query_sumsq, argmax)
    ctx.query_mode = query_mode
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
    if ctx.query_mode == 3:
        grad_cls = None if grad_query is None or not need_cls else grad_query.to(ctx.cls_dtype)
        grad_query = None  # the tokens only receive the token slice
    if need_x and grad_query is not None:
        grad_x = triton_grad_x(g_out, grad_query, argmax, ctx.query_mode, ctx.tokens, prompt_tokens, ctx.x_dtype)
    elif need_x and g_out is not None:
        grad_x = g_out[:, prompt_tokens:].to(ctx.x_dtype)  # a view when the dtypes match: no copy
    return grad_x, grad_prompt, grad_keys if need_keys else None, grad_cls, None, None, None, None


triton_pool_forward.register_autograd(_triton_pool_forward_backward, setup_context=_triton_pool_forward_setup)


@torch.library.custom_op(
    "l2p_fast::triton_prepend", mutates_args=(), schema="(Tensor prompt, Tensor x_embed) -> Tensor"
)
def triton_prepend(prompt: Tensor, x_embed: Tensor) -> Tensor:
    """Non-pool mode: prompt (Lp, D) before every row of x_embed (B, N, D) → (B, Lp + N, D)."""
    return _triton_launchers().launch_prepend(prompt, x_embed)


@triton_prepend.register_fake
def _triton_prepend_fake(prompt, x_embed):
    batch, tokens, width = x_embed.shape
    dtype = torch.promote_types(prompt.dtype, x_embed.dtype)
    return x_embed.new_empty((batch, prompt.shape[0] + tokens, width), dtype=dtype)


def _triton_prepend_setup(ctx, inputs, output) -> None:
    prompt, x_embed = inputs
    ctx.length, ctx.prompt_dtype, ctx.x_dtype = prompt.shape[0], prompt.dtype, x_embed.dtype


def _triton_prepend_backward(ctx, g_out):
    grad_prompt = grad_x = None
    if ctx.needs_input_grad[0]:
        rows = g_out.new_zeros((g_out.shape[0], 1), dtype=torch.int64)  # every row uses prompt 0
        grad_prompt = triton_grad_prompt(g_out, rows, 1, ctx.length, ctx.prompt_dtype)[0]
    if ctx.needs_input_grad[1]:
        grad_x = g_out[:, ctx.length:].to(ctx.x_dtype)
    return grad_prompt, grad_x


triton_prepend.register_autograd(_triton_prepend_backward, setup_context=_triton_prepend_setup)


@torch.library.custom_op(
    "l2p_fast::triton_grad_prompt",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor idx, int pool_size, int length, ScalarType dtype) -> Tensor",
)
def triton_grad_prompt(grad_out: Tensor, idx: Tensor, pool_size: int, length: int, dtype: torch.dtype) -> Tensor:
    """grad prompt (M, Lp, D): Σ of grad_out (B, K·Lp + N, D) slot rows over every (b, j) with idx[b, j] = m."""
    return _triton_launchers().launch_grad_prompt(grad_out, idx, pool_size, length, dtype)


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
    return _triton_launchers().launch_grad_similarity(
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
    return _triton_launchers().launch_grad_x(grad_out, grad_query, argmax, query_mode, tokens, prompt_tokens, dtype)


@triton_grad_x.register_fake
def _triton_grad_x_fake(grad_out, grad_query, argmax, query_mode, tokens, prompt_tokens, dtype):
    return grad_query.new_empty((grad_query.shape[0], tokens, grad_query.shape[1]), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# l2p_fast::pool_forward / l2p_fast::pool_backward                              [native, fused]
# The whole pool-mode forward (SPEC §4) in one op; its backward in a second op. Kernels in
# csrc/cpu/pool.cpp and csrc/cuda/pool.cu; arithmetic shared in csrc/common/pool_math.h; autograd
# in C++ (csrc/cpu/pool_autograd.cpp).
# ---------------------------------------------------------------------------------------------
POOL_MODES = {"mean": 0, "max": 1, "mean_max": 2, "cls": 1}  # 'cls' without cls_features: the token max
POOL_MODE_CLS = 3  # the query is cls_features


def pool_mode(embedding_key: str, has_cls_features: bool) -> int:
    """Query mode of ``pool_forward``: 0 mean, 1 max, 2 mean_max, 3 cls_features."""
    if embedding_key == "cls" and has_cls_features:
        return POOL_MODE_CLS
    return POOL_MODES[embedding_key]


def _pool_forward_fake(x_embed, cls_features, prompt, keys, prompt_mask, mode, top_k, batchwise):
    batch, tokens, width = x_embed.shape
    pool, length, _ = prompt.shape
    k = prompt_mask.shape[1] if prompt_mask is not None else top_k
    acc = torch.promote_types(torch.promote_types(x_embed.dtype, keys.dtype), torch.float32)
    out = torch.promote_types(prompt.dtype, x_embed.dtype)
    return (
        x_embed.new_empty((batch, k * length + tokens, width), dtype=out),
        x_embed.new_empty((batch, width), dtype=acc),
        x_embed.new_empty((pool, width), dtype=acc),
        x_embed.new_empty((batch, pool), dtype=acc),
        x_embed.new_empty((batch, k), dtype=torch.int64),
        x_embed.new_empty((batch, k, width), dtype=acc),
        x_embed.new_empty((), dtype=acc),
        x_embed.new_empty((batch, width) if mode in (1, 2) else (0,), dtype=torch.int32),
        x_embed.new_empty((batch,), dtype=acc),
        x_embed.new_empty((pool,), dtype=acc),
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
        new((batch, width) if need_query and mode == POOL_MODE_CLS else (0,), dtype=query_dtype),
        new((pool, length, width) if need_prompt else (0,), dtype=prompt_dtype),
        new((pool, width) if need_keys else (0,), dtype=keys_dtype),
    )


def pool_forward(
    x_embed: Tensor,
    prompt: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    batchwise: bool,
    cls_features: Tensor | None = None,
    prompt_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Fused native pool forward: x_embed (B, N, D), prompt (M, Lp, D), keys (M, D) → SPEC §4.5 tensors.

    cls_features (B, D) is the query when ``embedding_key == 'cls'``; prompt_mask (B, K') replaces the
    selection. Differentiable in x_embed, cls_features, prompt and keys.
    """
    mode = pool_mode(embedding_key, cls_features is not None)
    prompted, x_norm, prompt_norm, similarity, idx, selected, reduce_sim = torch.ops.l2p_fast.pool_forward.default(
        x_embed, cls_features if mode == POOL_MODE_CLS else None, prompt, keys, prompt_mask, mode, top_k, batchwise
    )[:7]  # the overload itself: the packet's overload resolution costs ~3 µs a call
    return pool_outputs(idx, prompt_norm, x_norm, similarity, selected, reduce_sim, prompted)


# The autograd of pool_forward is a C++ kernel (csrc/cpu/pool_autograd.cpp, Autograd dispatch key): it
# saves (x_embed_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax) and calls pool_backward, so the
# training path runs no Python. Only the fakes are registered here.
if _native.is_built() and hasattr(torch.ops.l2p_fast, "pool_forward"):
    torch.library.register_fake("l2p_fast::pool_forward")(_pool_forward_fake)
    torch.library.register_fake("l2p_fast::pool_backward")(_pool_backward_fake)


# ---------------------------------------------------------------------------------------------
# Sequence assembly of the prompted models (l2p_fast/models/assembly.py is the reference).
# l2p_fast::assemble(x (B, N, D), prompt (M, Lp, D), idx (B, K), cls (1|B, 1, D), pos? (1, S, D))
#   -> [cls, prompt[idx], x] + pos (B, S = 1 + K·Lp + N, D) in the promoted dtype      [native]
# l2p_fast::assemble_prompt_grad(grad (B, S, D), idx, M, Lp) -> (M, Lp, D)             [native]
# l2p_fast::assemble_triton / assemble_prompt_grad_triton: the same, as Triton custom ops (kernels in
# kernels/assemble.py, launchers in l2p_fast/models/assembly_triton.py, imported lazily).
# ---------------------------------------------------------------------------------------------
def _assemble_fake(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    dtype = torch.promote_types(torch.promote_types(x.dtype, prompt.dtype), cls.dtype)
    dtype = dtype if pos is None else torch.promote_types(dtype, pos.dtype)
    seq = 1 + idx.shape[1] * prompt.shape[1] + x.shape[1]
    return x.new_empty((x.shape[0], seq, x.shape[2]), dtype=dtype)


def _assemble_prompt_grad_fake(grad: Tensor, idx: Tensor, pool_size: int, length: int) -> Tensor:
    return grad.new_empty((pool_size, length, grad.shape[2]))


def _assemble_setup(ctx, inputs, output) -> None:
    x, prompt, idx, cls, pos = inputs
    ctx.save_for_backward(idx)
    ctx.meta = (x.dtype, prompt.dtype, prompt.shape[0], prompt.shape[1], cls.dtype, cls.shape[0])
    ctx.pos_dtype = None if pos is None else pos.dtype


def _assemble_grads(ctx, grad: Tensor, prompt_grad) -> tuple[Tensor | None, ...]:
    """Grads of (x, prompt, idx, cls, pos): slices/sums of ``grad``; the prompt's by ``prompt_grad``."""
    (idx,) = ctx.saved_tensors
    x_dtype, prompt_dtype, pool_size, length, cls_dtype, cls_rows = ctx.meta
    need = ctx.needs_input_grad
    grad_x = grad[:, 1 + idx.shape[1] * length :].to(x_dtype) if need[0] else None
    grad_prompt = prompt_grad(grad, idx, pool_size, length).to(prompt_dtype) if need[1] else None
    grad_cls = None
    if need[3]:
        grad_cls = (grad[:, :1].sum(0, keepdim=True) if cls_rows == 1 else grad[:, :1]).to(cls_dtype)
    grad_pos = grad.sum(0, keepdim=True).to(ctx.pos_dtype) if ctx.pos_dtype is not None and need[4] else None
    return grad_x, grad_prompt, None, grad_cls, grad_pos


def _assemble_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    return _assemble_grads(ctx, grad, torch.ops.l2p_fast.assemble_prompt_grad)


def _prompt_grad_setup(ctx, inputs, output) -> None:
    grad, idx, _pool_size, _length = inputs
    ctx.save_for_backward(idx)
    ctx.grad_shape, ctx.grad_dtype = tuple(grad.shape), grad.dtype


def _prompt_grad_backward(ctx, upstream: Tensor) -> tuple[Tensor | None, ...]:
    """The prompt-gradient sum is linear in grad (B, S, D): its gradient puts upstream[idx[b, j], l] (M, Lp, D) at
    row 1 + j·Lp + l of sample b and zeros elsewhere. Stock ops, so the assembly is differentiable to any order."""
    (idx,) = ctx.saved_tensors
    batch, seq, width = ctx.grad_shape
    head = upstream[idx].reshape(batch, -1, width).to(ctx.grad_dtype)  # (B, K·Lp, D)
    return torch.nn.functional.pad(head, (0, 0, 1, seq - 1 - head.shape[1])), None, None, None


def assemble(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    """Native one-pass assembly ``[cls, prompt[idx], x] + pos`` → (B, 1 + K·Lp + N, D); differentiable."""
    return torch.ops.l2p_fast.assemble(x, prompt, idx, cls, pos)


if _native.is_built() and hasattr(torch.ops.l2p_fast, "assemble"):
    torch.library.register_fake("l2p_fast::assemble")(_assemble_fake)
    torch.library.register_fake("l2p_fast::assemble_prompt_grad")(_assemble_prompt_grad_fake)
    torch.library.register_autograd("l2p_fast::assemble", _assemble_backward, setup_context=_assemble_setup)
    torch.library.register_autograd(
        "l2p_fast::assemble_prompt_grad", _prompt_grad_backward, setup_context=_prompt_grad_setup
    )


def _assembly_launchers():
    from .models import assembly_triton

    return assembly_triton


@torch.library.custom_op(
    "l2p_fast::assemble_prompt_grad_triton",
    mutates_args=(),
    schema="(Tensor grad, Tensor idx, int pool_size, int length) -> Tensor",
)
def assemble_prompt_grad_triton(grad: Tensor, idx: Tensor, pool_size: int, length: int) -> Tensor:
    """Triton per-prompt grad sum: grad (B, 1 + K·Lp + N, D), idx (B, K) → (M, Lp, D) in grad's dtype."""
    return _assembly_launchers().launch_prompt_grad(grad, idx, pool_size, length)


assemble_prompt_grad_triton.register_fake(_assemble_prompt_grad_fake)
assemble_prompt_grad_triton.register_autograd(_prompt_grad_backward, setup_context=_prompt_grad_setup)


@torch.library.custom_op(
    "l2p_fast::assemble_triton",
    mutates_args=(),
    schema="(Tensor x, Tensor prompt, Tensor idx, Tensor cls, Tensor? pos) -> Tensor",
)
def assemble_triton(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    """Triton one-pass assembly ``[cls, prompt[idx], x] + pos`` → (B, 1 + K·Lp + N, D); differentiable."""
    return _assembly_launchers().launch_assemble(x, prompt, idx, cls, pos)


assemble_triton.register_fake(_assemble_fake)
assemble_triton.register_autograd(
    lambda ctx, grad: _assemble_grads(ctx, grad, assemble_prompt_grad_triton), setup_context=_assemble_setup
)
