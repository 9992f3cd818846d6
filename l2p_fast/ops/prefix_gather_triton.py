"""The Triton backend of ``prefix_gather`` (docs in ``prefix_gather.py``): custom ops, fakes, autograd, launchers.

Device code in ``kernels/prefix_gather.py`` (installed as ``l2p_fast.kernels.prefix_gather``), imported on
the first launch so ``TRITON_INTERPRET`` may be set after ``l2p_fast`` is imported. Inputs are made
contiguous (prompt (L, C, M, R) is a parameter view, idx (B, K) tiny).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor

from ..dispatch import register
from .triton_launch import big_blocks, device_guard, pow2, reject_forward_ad


@functools.cache
def _device() -> ModuleType:
    from l2p_fast.kernels import prefix_gather

    return prefix_gather


def _block(row: int) -> int:
    return pow2(row, low=16, high=1 << 14 if big_blocks() else 1024)


def launch_gather(prompt: Tensor, idx: Tensor, batch_first: bool) -> Tensor:
    """prompt (L, C, M, R), idx (B, K) → (L, B, C, K, R) or (L, C, B, K, R)."""
    prompt, idx = prompt.contiguous(), idx.contiguous()
    layers, dual, pool_size, row = prompt.shape
    batch, k = idx.shape
    shape = (layers, batch, dual, k, row) if batch_first else (layers, dual, batch, k, row)
    out = torch.empty(shape, dtype=prompt.dtype, device=prompt.device)
    block = _block(row)
    with device_guard(prompt):
        _device().gather_kernel[(layers * dual, -(-row // block))](
            prompt, idx, out, dual, pool_size, batch, k, row, BATCH_FIRST=batch_first, BLOCK_R=block
        )
    return out


def launch_gather_grad(grad: Tensor, idx: Tensor, pool_size: int, batch_first: bool) -> Tensor:
    """grad of the gather's output → grad prompt (L, C, M, R), rows summed per id in (b, j) order."""
    grad, idx = grad.contiguous(), idx.contiguous()
    layers, row = grad.shape[0], grad.shape[-1]
    dual = grad.shape[2] if batch_first else grad.shape[1]
    batch, k = idx.shape
    out = torch.empty((layers, dual, pool_size, row), dtype=grad.dtype, device=grad.device)
    block = _block(row)
    with device_guard(grad):
        _device().gather_grad_kernel[(layers * dual * pool_size, -(-row // block))](
            grad, idx, out, dual, pool_size, batch, k, row,
            BATCH_FIRST=batch_first, ACC_FP64=grad.dtype == torch.float64, BLOCK_R=block,
        )  # fmt: skip
    return out


@torch.library.custom_op(
    "l2p_fast::prefix_gather_triton", mutates_args=(), schema="(Tensor prompt, Tensor idx, bool batch_first) -> Tensor"
)
def prefix_gather_triton(prompt: Tensor, idx: Tensor, batch_first: bool) -> Tensor:
    """Triton gather: prompt (L, C, M, R), idx (B, K) → (L, B, C, K, R) or (L, C, B, K, R)."""
    return launch_gather(prompt, idx, batch_first)


@prefix_gather_triton.register_fake
def _gather_fake(prompt, idx, batch_first):
    layers, dual, _, row = prompt.shape
    batch, k = idx.shape
    return prompt.new_empty((layers, batch, dual, k, row) if batch_first else (layers, dual, batch, k, row))


@torch.library.custom_op(
    "l2p_fast::prefix_gather_backward_triton",
    mutates_args=(),
    schema="(Tensor grad, Tensor idx, int pool_size, bool batch_first) -> Tensor",
)
def prefix_gather_backward_triton(grad: Tensor, idx: Tensor, pool_size: int, batch_first: bool) -> Tensor:
    """Triton gather backward → grad prompt (L, C, M, R) (deterministic, no atomics)."""
    return launch_gather_grad(grad, idx, pool_size, batch_first)


@prefix_gather_backward_triton.register_fake
def _gather_grad_fake(grad, idx, pool_size, batch_first):
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
    return prefix_gather_backward_triton(grad, idx, ctx.pool_size, ctx.batch_first), None, None


prefix_gather_triton.register_autograd(_backward, setup_context=_setup)


@register("prefix_gather", "triton")
def triton_prefix_gather(prompt: Tensor, idx: Tensor, batch_first: bool) -> Tensor:
    """The Triton backend of ``prefix_gather`` (refuses forward-mode AD with a clear error; differentiable once)."""
    reject_forward_ad("prefix gather", prompt)
    return prefix_gather_triton(prompt, idx, batch_first)
