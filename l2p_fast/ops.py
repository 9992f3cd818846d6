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
