"""Non-pool mode (docs/behaviour.md §3, §6): the one prompt (Lp, D) before every sample's tokens.

- reference, cpu, cuda: ``l2p_fast.reference.prepend`` (a ``torch.cat``; there is no native kernel:
  a concat is already one pass).
- triton: the custom op ``l2p_fast::triton_prepend`` (schema, fake, autograd here; launcher
  ``launch_prepend`` in ``pool_triton.py`` beside the pool's; device code ``prepend_kernel`` in
  ``kernels/tuned.py``; its prompt gradient reuses the pool's ``triton_grad_prompt``).

Every implementation takes (prompt (Lp, D), x_embed (B, N, D)) → (B, Lp + N, D).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..dispatch import register
from .pool import triton_grad_prompt
from .pool_triton import launch_prepend
from .triton_launch import reject_forward_ad

register("prepend", "reference", "cpu", "cuda")(reference.prepend)


@torch.library.custom_op(
    "l2p_fast::triton_prepend", mutates_args=(), schema="(Tensor prompt, Tensor x_embed) -> Tensor"
)
def triton_prepend(prompt: Tensor, x_embed: Tensor) -> Tensor:
    """Non-pool mode: prompt (Lp, D) before every row of x_embed (B, N, D) → (B, Lp + N, D)."""
    return launch_prepend(prompt, x_embed)


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


@register("prepend", "triton")
def triton_prepend_forward(prompt: Tensor, x_embed: Tensor) -> Tensor:
    """The Triton backend of ``prepend`` (refuses forward-mode AD with a clear error)."""
    reject_forward_ad("prepend", prompt, x_embed)
    return triton_prepend(prompt, x_embed)
