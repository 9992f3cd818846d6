"""One-pass sequence assembly of the prompted models: ``[cls, prompt[idx], x] + pos`` written once.

The port builds the prompted ViT input with ``cat(prompts, x)``, ``cat(cls, ·)`` and ``· + pos``: three
fresh full-size (B, S, D) tensors. ``assemble`` writes the final (B, S = 1 + K·Lp + N, D) sequence
directly from x (B, N, D), the pool's prompts (M, Lp, D), the selected ids idx (B, K), the CLS token
(1 or B, 1, D) and the positional table (1, S, D) (or None: no positions, as for a BERT encoder that
adds its own). Output dtype: the promotion of the inputs' dtypes.

- reference: ``l2p_fast.reference.assemble`` (the port's concat, concat, add; ``assemble_reference``
  is the same without the id clamp). The fused backends match it bit-exactly.
- cpu / cuda: native ops ``l2p_fast::assemble`` and ``l2p_fast::assemble_prompt_grad`` (schemas in
  ``csrc/bindings.cpp``, kernels in ``csrc/cpu/assemble.cpp`` / ``csrc/cuda/assemble.cu``); fakes and
  autograd here.
- triton: custom ops ``l2p_fast::assemble_triton`` / ``assemble_prompt_grad_triton`` here; launchers in
  ``l2p_fast/ops/assemble_triton.py``; device code in ``kernels/assemble.py``.

Differentiable to any order in every float input (the prompt-gradient ops have their own autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native, reference
from ..dispatch import implementation, register
from ..modes import promoted_dtype
from ..validation import ids_unchecked, validate_assembly
from . import assemble_triton
from .triton_launch import reject_forward_ad

register("assemble", "reference")(reference.assemble)


def assemble(
    x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None, *, backend: str = "auto"
) -> Tensor:
    """Write ``[cls, prompt[idx], x] + pos`` once → (B, 1 + K·Lp + N, D), differentiable in every float input.

    x (B, N, D) (N may be 0), prompt (M, Lp, D), idx (B, K) int64 ids in [0, M), cls (1 | B, 1, D),
    pos (1, 1 + K·Lp + N, D) or None. ``backend``: 'auto', 'reference', 'cpu', 'cuda' or 'triton'
    (``l2p_fast.dispatch``). Ids out of range raise in eager mode on CPU tensors and are clamped to
    [0, M − 1] elsewhere (``l2p_fast.validation``).
    """
    validate_assembly(x, prompt, idx, cls, pos)
    return implementation("assemble", backend, x.device.type)(x, prompt, idx, cls, pos)


def _assemble_fake(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    dtype = promoted_dtype(x.dtype, prompt.dtype, cls.dtype, None if pos is None else pos.dtype)
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
    grad, idx, pool_size, _length = inputs
    ctx.save_for_backward(idx)
    ctx.grad_shape, ctx.grad_dtype, ctx.pool_size = tuple(grad.shape), grad.dtype, pool_size


def _prompt_grad_backward(ctx, upstream: Tensor) -> tuple[Tensor | None, ...]:
    """The prompt-gradient sum is linear in grad (B, S, D): its gradient puts upstream[idx[b, j], l] (M, Lp, D) at
    row 1 + j·Lp + l of sample b and zeros elsewhere. Stock ops, so the assembly is differentiable to any order."""
    (idx,) = ctx.saved_tensors
    batch, seq, width = ctx.grad_shape
    head = upstream[idx.clamp(0, ctx.pool_size - 1)].reshape(batch, -1, width).to(ctx.grad_dtype)  # (B, K·Lp, D)
    return torch.nn.functional.pad(head, (0, 0, 1, seq - 1 - head.shape[1])), None, None, None


if _native.has_op("assemble"):
    torch.library.register_fake("l2p_fast::assemble")(_assemble_fake)
    torch.library.register_fake("l2p_fast::assemble_prompt_grad")(_assemble_prompt_grad_fake)
    torch.library.register_autograd("l2p_fast::assemble", _assemble_backward, setup_context=_assemble_setup)
    torch.library.register_autograd(
        "l2p_fast::assemble_prompt_grad", _prompt_grad_backward, setup_context=_prompt_grad_setup
    )


@register("assemble", "cpu", "cuda")
def native_assemble(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    """Native one-pass assembly (C++/CUDA op); ids clamped where they were not checked."""
    if ids_unchecked(idx):
        idx = idx.clamp(0, prompt.shape[0] - 1)
    return torch.ops.l2p_fast.assemble(x, prompt, idx, cls, pos)


@torch.library.custom_op(
    "l2p_fast::assemble_prompt_grad_triton",
    mutates_args=(),
    schema="(Tensor grad, Tensor idx, int pool_size, int length) -> Tensor",
)
def assemble_prompt_grad_triton(grad: Tensor, idx: Tensor, pool_size: int, length: int) -> Tensor:
    """Triton per-prompt grad sum: grad (B, 1 + K·Lp + N, D), idx (B, K) → (M, Lp, D) in grad's dtype."""
    return assemble_triton.launch_prompt_grad(grad, idx, pool_size, length)


assemble_prompt_grad_triton.register_fake(_assemble_prompt_grad_fake)
assemble_prompt_grad_triton.register_autograd(_prompt_grad_backward, setup_context=_prompt_grad_setup)


@torch.library.custom_op(
    "l2p_fast::assemble_triton",
    mutates_args=(),
    schema="(Tensor x, Tensor prompt, Tensor idx, Tensor cls, Tensor? pos) -> Tensor",
)
def assemble_triton_op(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    """Triton one-pass assembly ``[cls, prompt[idx], x] + pos`` → (B, 1 + K·Lp + N, D); differentiable."""
    return assemble_triton.launch_assemble(x, prompt, idx, cls, pos)


assemble_triton_op.register_fake(_assemble_fake)
assemble_triton_op.register_autograd(
    lambda ctx, grad: _assemble_grads(ctx, grad, assemble_prompt_grad_triton), setup_context=_assemble_setup
)


@register("assemble", "triton")
def triton_assemble(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    """The Triton backend of ``assemble``; ids clamped where they were not checked; no forward-mode AD."""
    reject_forward_ad("assembly", x, prompt, cls, pos)
    if ids_unchecked(idx):
        idx = idx.clamp(0, prompt.shape[0] - 1)
    return assemble_triton_op(x, prompt, idx, cls, pos)
