"""The token query (docs/behaviour.md §4.1) on its own: x (B, N, D) → q (B, D) by 'mean', 'max' or 'mean_max'.

The fused pool computes its query inside ``pool_forward``; this op exposes the reduction alone.

- reference: ``l2p_fast.reference.query`` in the compute dtype.
- cpu / cuda: the native op ``l2p_fast::query_reduce(Tensor x, int mode) -> (Tensor q, Tensor argmax)``
  (schema in ``csrc/bindings.cpp``, kernels in ``csrc/cpu/query_reduce.cpp`` / ``csrc/cuda/query_reduce.cu``);
  its fake and autograd here. q is in the compute dtype (``l2p_fast.modes.compute_dtype``), argmax (B, D)
  int64 (empty for the mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native, reference
from ..dispatch import register
from ..modes import QUERY_MODES, compute_dtype, takes_token_max


@register("query_reduce", "reference")
def reference_query_reduce(x: Tensor, embedding_key: str) -> Tensor:
    """Reference token query: x (B, N, D) → (B, D) in the compute dtype."""
    return reference.query(x, embedding_key, None, compute_dtype(x.dtype, x.dtype))


def _query_reduce_fake(x: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    q = x.new_empty((x.shape[0], x.shape[2]), dtype=compute_dtype(x.dtype, x.dtype))
    argmax_shape = (x.shape[0], x.shape[2]) if takes_token_max(mode) else (0, 0)
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
    if takes_token_max(ctx.mode):
        grad_x.scatter_add_(1, argmax.unsqueeze(1), grad_q.unsqueeze(1))
    return grad_x.to(ctx.x_dtype), None


if _native.has_op("query_reduce"):
    torch.library.register_fake("l2p_fast::query_reduce")(_query_reduce_fake)
    torch.library.register_autograd(
        "l2p_fast::query_reduce", _query_reduce_backward, setup_context=_query_reduce_setup
    )


@register("query_reduce", "cpu", "cuda")
def query_reduce(x: Tensor, embedding_key: str) -> Tensor:
    """Native token query: x (B, N, D) → (B, D) in the compute dtype; differentiable."""
    return torch.ops.l2p_fast.query_reduce(x, QUERY_MODES[embedding_key])[0]
