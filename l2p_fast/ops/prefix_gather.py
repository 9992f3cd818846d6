"""``prefix_gather``: the selected prompts of every layer, written once in the layout the blocks read.

prompt (L, C, M, R) (C = 2 key/value halves for prefix-tuning, 1 for prompt-tuning; R = Lp·H·Dh or
Lp·D flattened), idx (B, K) int64 → out[l, b, c, j] = prompt[l, c, idx[b, j]] laid out as
(L, B, C, K, R) (``batch_first=True``: the correct prefix layout) or (L, C, B, K, R)
(``batch_first=False``: reshaped as (L, B, C, K·Lp, …) this is the DualPrompt port's layout, see
``l2p_fast.dualprompt.reference``). One pass: a single row gather by flat row ids, no (B, K, Lp, …)
temporary.

Backward: grad prompt (L, C, M, R) = Σ over every (b, j) with idx[b, j] = m of the output rows, in a fixed
order, with no atomics, so the same inputs give bit-identical gradients.

- reference: ``reference_prefix_gather`` (advanced indexing, plain autograd).
- cpu: ``index_prefix_gather``, one ``index_select`` by flat row ids whose autograd backward is ATen's own
  ``index_add_``; on the CPU it adds the rows serially in the ids' (b, j) order, each row vectorised (~30×
  faster here than ``index_put_(accumulate=True)``, whose CPU kernel adds element by element). No custom op:
  wrapping the same two calls in one cost ~90 µs of Python per forward + backward at the DualPrompt shape
  (L, B, K, Lp, D) = (3, 16, 1, 5, 768), about a third of the E-prompt module's training step.
- cuda: the custom op ``l2p_fast::prefix_gather`` (+ ``l2p_fast::prefix_gather_backward``: ``index_put_``
  with ``accumulate=True``, sort-based on CUDA, where ``index_add_`` uses atomics), schema, fake and autograd
  here. It also takes CPU tensors (backward ``index_add_``), which is how its tests run without a GPU.
- triton: the custom op ``l2p_fast::prefix_gather_triton`` (``prefix_gather_triton.py``).

Ids are clamped to [0, M − 1] (as every backend of the pool does where ids are not checked).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import implementation, register
from . import prefix_gather_triton  # noqa: F401  (registers the Triton backend)


def check_gather(prompt: Tensor, idx: Tensor) -> None:
    """prompt (L, C, M, R) float, idx (B, K) int64 on prompt's device, B, K, M >= 1."""
    if not isinstance(prompt, Tensor) or not prompt.is_floating_point() or prompt.dim() != 4:
        got = tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__
        raise ValueError(f"prompt: expected a float tensor (L, C, M, R), got {got}")
    if prompt.shape[2] < 1:
        raise ValueError(f"prompt: expected M >= 1 prompts, got shape {tuple(prompt.shape)}")
    if not isinstance(idx, Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"idx: expected an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.dim() != 2 or idx.shape[0] < 1 or idx.shape[1] < 1 or idx.device != prompt.device:
        raise ValueError(
            f"idx: expected (B, K) with B, K >= 1 on {prompt.device}, got {tuple(idx.shape)} on {idx.device}"
        )


def prefix_gather(prompt: Tensor, idx: Tensor, batch_first: bool = True, *, backend: str = "auto") -> Tensor:
    """prompt (L, C, M, R), idx (B, K) → (L, B, C, K, R) if ``batch_first`` else (L, C, B, K, R).

    Differentiable in ``prompt`` (deterministic backward). ``backend``: 'auto', 'reference', 'cpu',
    'cuda' or 'triton' (``l2p_fast.dispatch``).
    """
    check_gather(prompt, idx)
    return implementation("prefix_gather", backend, prompt.device.type)(prompt, idx, batch_first)


@register("prefix_gather", "reference")
def reference_prefix_gather(prompt: Tensor, idx: Tensor, batch_first: bool) -> Tensor:
    """Advanced indexing: ``prompt[:, :, idx]`` (L, C, B, K, R), batch axis moved first when asked."""
    out = prompt[:, :, idx.clamp(0, prompt.shape[2] - 1)]
    return out.permute(0, 2, 1, 3, 4).contiguous() if batch_first else out


def flat_rows(idx: Tensor, layers: int, dual: int, pool_size: int, batch_first: bool) -> Tensor:
    """Row ids into prompt viewed as (L·C·M, R), in the output's order: (L, B, C, K) or (L, C, B, K), flattened."""
    ids = idx.clamp(0, pool_size - 1)
    batch, k = idx.shape
    base = torch.arange(0, layers * dual * pool_size, pool_size, device=idx.device)  # (l·C + c)·M
    if batch_first:
        return (base.view(layers, 1, dual, 1) + ids.reshape(1, batch, 1, k)).reshape(-1)
    return (base.view(layers, dual, 1, 1) + ids.reshape(1, 1, batch, k)).reshape(-1)


@register("prefix_gather", "cpu")
def index_prefix_gather(prompt: Tensor, idx: Tensor, batch_first: bool) -> Tensor:
    """One ``index_select`` by flat row ids (autograd's backward: ``index_add_``, serial in (b, j) order on the
    CPU): prompt (L, C, M, R), idx (B, K) → (L, B, C, K, R) or (L, C, B, K, R)."""
    layers, dual, pool_size, row = prompt.shape
    rows = flat_rows(idx, layers, dual, pool_size, batch_first)
    out = prompt.reshape(layers * dual * pool_size, row).index_select(0, rows)
    batch, k = idx.shape
    return out.view(layers, batch, dual, k, row) if batch_first else out.view(layers, dual, batch, k, row)


@torch.library.custom_op(
    "l2p_fast::prefix_gather", mutates_args=(), schema="(Tensor prompt, Tensor idx, bool batch_first) -> Tensor"
)
def native_prefix_gather(prompt: Tensor, idx: Tensor, batch_first: bool) -> Tensor:
    """One row gather: prompt (L, C, M, R), idx (B, K) → (L, B, C, K, R) or (L, C, B, K, R)."""
    return index_prefix_gather(prompt, idx, batch_first)


@native_prefix_gather.register_fake
def _prefix_gather_fake(prompt, idx, batch_first):
    layers, dual, _, row = prompt.shape
    batch, k = idx.shape
    shape = (layers, batch, dual, k, row) if batch_first else (layers, dual, batch, k, row)
    return prompt.new_empty(shape)


@torch.library.custom_op(
    "l2p_fast::prefix_gather_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor idx, int pool_size, bool batch_first) -> Tensor",
)
def prefix_gather_backward(grad: Tensor, idx: Tensor, pool_size: int, batch_first: bool) -> Tensor:
    """grad (L, B, C, K, R) or (L, C, B, K, R) → grad prompt (L, C, M, R): rows summed per id, fixed order."""
    layers, row = grad.shape[0], grad.shape[-1]
    dual = grad.shape[2] if batch_first else grad.shape[1]
    rows = flat_rows(idx, layers, dual, pool_size, batch_first)
    out = grad.new_zeros((layers * dual * pool_size, row))
    if grad.device.type == "cpu":  # serial, in the rows' order (the Triton kernel's (b, j) order); vectorised rows
        out.index_add_(0, rows, grad.reshape(-1, row))
    else:  # CUDA's index_add_ uses atomics; index_put_ with accumulate sorts the ids (deterministic)
        out.index_put_((rows,), grad.reshape(-1, row), accumulate=True)
    return out.view(layers, dual, pool_size, row)


@prefix_gather_backward.register_fake
def _prefix_gather_backward_fake(grad, idx, pool_size, batch_first):
    dual = grad.shape[2] if batch_first else grad.shape[1]
    return grad.new_empty((grad.shape[0], dual, pool_size, grad.shape[-1]))


def _setup(ctx, inputs, output) -> None:
    prompt, idx, batch_first = inputs
    ctx.save_for_backward(idx)
    ctx.pool_size, ctx.batch_first = prompt.shape[2], batch_first


def _backward(ctx, grad: Tensor):
    (idx,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return prefix_gather_backward(grad, idx, ctx.pool_size, ctx.batch_first), None, None


def _backward_backward_setup(ctx, inputs, output) -> None:
    _grad, idx, _pool_size, batch_first = inputs
    ctx.save_for_backward(idx)
    ctx.batch_first = batch_first


def _backward_backward(ctx, grad_grad_prompt: Tensor):
    (idx,) = ctx.saved_tensors
    return native_prefix_gather(grad_grad_prompt, idx, ctx.batch_first), None, None, None


native_prefix_gather.register_autograd(_backward, setup_context=_setup)
prefix_gather_backward.register_autograd(_backward_backward, setup_context=_backward_backward_setup)
register("prefix_gather", "cuda")(native_prefix_gather)
