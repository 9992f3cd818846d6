"""The Triton backend of ``coda_prompt`` (math and docs in ``coda.py``): launchers, custom ops, fakes, autograd.

Device code in ``kernels/coda.py`` (installed as ``l2p_fast.kernels.coda``), imported on the first launch so
``TRITON_INTERPRET`` may be set after ``l2p_fast`` is imported. Forward: the weights kernel, then the rows kernel
writes the mix (B, Lp, D). Backward (the custom op ``l2p_fast::coda_prompt_backward_triton``): the rowdot kernel
gives G = ∂L/∂α, the rows kernel ∂P = αᵀ·g (rows outside the trainable slice zero), then three kernels the rest:
the factors ∂n, ∂s2, G·α (B, F) and the masked r_k², ∂K and ∂A (M, Dk), ∂q (B, Dk).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor

from ..dispatch import register
from .coda_math import coda_fake, coda_setup, compute_dtype
from .triton_launch import big_blocks, device_guard, pow2, reject_forward_ad


@functools.cache
def _device() -> ModuleType:
    from l2p_fast.kernels import coda

    return coda


def _block(n: int, gpu_high: int) -> int:
    return pow2(n, low=16, high=1 << 14 if big_blocks() else gpu_high)


def launch_weights(q: Tensor, keys: Tensor, attn: Tensor, out_dtype: torch.dtype) -> Tensor:
    """α (B, F) of q (B, Dk) against the used rows keys, attn (F, Dk), stored in ``out_dtype``."""
    q, keys, attn = q.contiguous(), keys.contiguous(), attn.contiguous()
    batch, key_dim = q.shape
    used = keys.shape[0]
    out = torch.empty((batch, used), dtype=out_dtype, device=q.device)
    block_m = _block(used, 16)
    block_d = _block(key_dim, 128)
    with device_guard(q):
        _device().coda_weights_kernel[(batch, -(-used // block_m))](
            q, keys, attn, out, key_dim, used,
            ACC_FP64=compute_dtype(keys.dtype) == torch.float64, BLOCK_M=block_m, BLOCK_D=block_d,
        )  # fmt: skip
    return out


def launch_rows(coef: Tensor, transpose: bool, src: Tensor, rows: int, lo: int, hi: int, out_dtype: torch.dtype
                ) -> Tensor:
    """out (rows, R) with out[i] = Σ_j c[i, j]·src[j] for i in [lo, hi), zero elsewhere; c = coef (rows, J), or
    coef (J, rows) read transposed when ``transpose``; src (J, R)."""
    coef, src = coef.contiguous(), src.contiguous()
    count, row = src.shape
    stride_i, stride_j = (1, coef.shape[1]) if transpose else (coef.shape[1], 1)
    out = torch.empty((rows, row), dtype=out_dtype, device=src.device)
    block = _block(row, 1024)
    with device_guard(src):
        _device().coda_rows_kernel[(rows, -(-row // block))](
            coef, src, out, count, row, stride_i, stride_j, lo, hi,
            ACC_FP64=compute_dtype(src.dtype) == torch.float64, BLOCK_R=block,
        )  # fmt: skip
    return out


def launch_rowdot(grad: Tensor, prompt_rows: Tensor, base: Tensor | None) -> Tensor:
    """G (B, F) = base + grad (B, R) · prompt_rows (F, R)ᵀ in the compute dtype."""
    grad, prompt_rows = grad.contiguous(), prompt_rows.contiguous()
    batch, row = grad.shape
    used = prompt_rows.shape[0]
    out = torch.empty((batch, used), dtype=compute_dtype(prompt_rows.dtype), device=grad.device)
    base = base.contiguous() if base is not None else out
    block_m = _block(used, 16)
    block_r = _block(row, 256)
    with device_guard(grad):
        _device().coda_rowdot_kernel[(batch, -(-used // block_m))](
            grad, prompt_rows, base, out, used, row, HAS_BASE=base is not out, BLOCK_M=block_m, BLOCK_R=block_r,
        )  # fmt: skip
    return out


def launch_weight_grads(q: Tensor, keys: Tensor, attn: Tensor, weights: Tensor, grad_w: Tensor, start: int
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(∂q (B, Dk), ∂keys, ∂attn (M, Dk)) from G = ∂L/∂α (B, F) and α; rows outside [start, F) zero."""
    q, keys, attn = q.contiguous(), keys.contiguous(), attn.contiguous()
    weights, grad_w = weights.contiguous(), grad_w.contiguous()
    batch, key_dim = q.shape
    pool, used = keys.shape[0], weights.shape[1]
    ct = compute_dtype(keys.dtype)
    grad_n, grad_s2, grad_gw = (torch.empty((batch, used), dtype=ct, device=q.device) for _ in range(3))
    key_scale = torch.empty((used,), dtype=ct, device=q.device)
    grad_q = torch.empty_like(q)
    grad_k, grad_a = torch.empty_like(keys), torch.empty_like(attn)
    block_m, block_d = _block(used, 16), _block(key_dim, 128)
    block_dk = _block(key_dim, 64)
    with device_guard(q):
        kernels = _device()
        kernels.coda_grad_factors_kernel[(batch, -(-used // block_m))](
            q, keys, attn, weights, grad_w, grad_n, grad_s2, grad_gw, key_scale, key_dim, used,
            ACC_FP64=ct == torch.float64, BLOCK_M=block_m, BLOCK_D=block_d,
        )  # fmt: skip
        rows = _block(pool, 16)
        kernels.coda_grad_keys_kernel[(-(-pool // rows), -(-key_dim // block_dk))](
            q, keys, attn, grad_n, grad_s2, grad_gw, key_scale, grad_k, grad_a, batch, key_dim, used, start, pool,
            BLOCK_M=rows, BLOCK_D=block_dk,
        )  # fmt: skip
        kernels.coda_grad_query_kernel[(batch, -(-key_dim // block_d))](
            q, keys, attn, grad_n, grad_s2, grad_q, key_dim, used, BLOCK_D=block_d,
        )  # fmt: skip
    return grad_q, grad_k, grad_a


@torch.library.custom_op(
    "l2p_fast::coda_prompt_triton", mutates_args=(),
    schema="(Tensor q, Tensor keys, Tensor attn, Tensor prompt, int start, int stop) -> (Tensor, Tensor)",
)  # fmt: skip
def coda_prompt_triton(q: Tensor, keys: Tensor, attn: Tensor, prompt: Tensor, start: int, stop: int):
    """Triton CODA mix: q (B, Dk), keys, attn (M, Dk), prompt (M, Lp, D) → (mixed (B, Lp, D), α (B, F))."""
    weights = launch_weights(q, keys[:stop], attn[:stop], prompt.dtype)
    batch, (_, length, width) = q.shape[0], prompt.shape
    rows = prompt[:stop].reshape(stop, length * width)
    mixed = launch_rows(weights, False, rows, batch, 0, batch, prompt.dtype)
    return mixed.view(batch, length, width), weights


coda_prompt_triton.register_fake(coda_fake)


@torch.library.custom_op(
    "l2p_fast::coda_prompt_backward_triton", mutates_args=(),
    schema="(Tensor grad_mixed, Tensor grad_weights, Tensor q, Tensor keys, Tensor attn, Tensor prompt, "
           "Tensor weights, int start) -> (Tensor, Tensor, Tensor, Tensor)",
)  # fmt: skip
def coda_prompt_backward_triton(grad_mixed: Tensor, grad_weights: Tensor, q: Tensor, keys: Tensor, attn: Tensor,
                                prompt: Tensor, weights: Tensor, start: int):
    """(∂q, ∂keys, ∂attn, ∂prompt) of the Triton CODA mix from ∂mixed (B, Lp, D) and ∂α (B, F); rows of ∂keys,
    ∂attn, ∂prompt outside [start, F) are zero."""
    stop = weights.shape[1]
    pool, length, width = prompt.shape
    g = grad_mixed.reshape(q.shape[0], length * width).to(prompt.dtype)
    grad_w = launch_rowdot(g, prompt[:stop].reshape(stop, length * width), grad_weights)
    grad_p = launch_rows(weights, True, g, pool, start, stop, prompt.dtype).view(pool, length, width)
    grad_q, grad_k, grad_a = launch_weight_grads(q, keys, attn, weights, grad_w, start)
    return grad_q, grad_k, grad_a, grad_p


@coda_prompt_backward_triton.register_fake
def _backward_fake(grad_mixed, grad_weights, q, keys, attn, prompt, weights, start):
    return q.new_empty(q.shape), keys.new_empty(keys.shape), attn.new_empty(attn.shape), prompt.new_empty(prompt.shape)


def _backward(ctx, grad_mixed: Tensor | None, grad_weights: Tensor | None):
    q, keys, attn, prompt, weights = ctx.saved_tensors
    if grad_mixed is None:
        grad_mixed = prompt.new_zeros((q.shape[0], *prompt.shape[1:]))
    if grad_weights is None:
        grad_weights = torch.zeros_like(weights)
    grad_q, grad_k, grad_a, grad_p = coda_prompt_backward_triton(grad_mixed, grad_weights, q, keys, attn, prompt,
                                                                  weights, ctx.start)
    return grad_q, grad_k, grad_a, grad_p, None, None


coda_prompt_triton.register_autograd(_backward, setup_context=coda_setup)


@register("coda_prompt", "triton")
def triton_coda_prompt(q: Tensor, keys: Tensor, attn: Tensor, prompt: Tensor, start: int, stop: int):
    """The Triton backend of ``coda_prompt`` (no forward-mode AD: a clear error; differentiable once)."""
    reject_forward_ad("CODA prompt mix", q, keys, attn, prompt)
    return coda_prompt_triton(q, keys, attn, prompt, start, stop)
