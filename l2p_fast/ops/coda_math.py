"""The math the CODA backends share (docs and formulas in ``coda.py``): the weight factors, the torch forward, the
gradient of the weights' inputs from G = ∂L/∂α, the custom ops' fake and autograd context.

Shapes: B batch, Dk query/key width, M pool, F = stop used rows, Lp prompt length, D width.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12  # F.normalize's clamp of a norm (l2p_fast.coda.reference.NORM_EPS)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the weights are computed in: fp32 for half types, else the input's."""
    return torch.promote_types(dtype, torch.float32)


def weight_factors(q: Tensor, keys: Tensor, attn: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(n (B, F), s2 (B, F), r_a (B, F), r_k (F,)) of q (B, Dk), keys, attn (F, Dk), in the compute dtype."""
    ct = compute_dtype(keys.dtype)
    q, keys, attn = q.to(ct), keys.to(ct), attn.to(ct)
    n = q @ (attn * keys).T
    s2 = (q * q) @ (attn * attn).T
    r_a = s2.sqrt().clamp_min(EPS).reciprocal()
    r_k = torch.linalg.vector_norm(keys, dim=1).clamp_min(EPS).reciprocal()
    return n, s2, r_a, r_k


def torch_forward(q: Tensor, keys: Tensor, attn: Tensor, prompt: Tensor, start: int, stop: int):
    """The cpu/cuda backend's forward: (mixed (B, Lp, D), α (B, F)) by matmuls, no (B, F, Dk)."""
    n, _, r_a, r_k = weight_factors(q, keys[:stop], attn[:stop])
    weights = (n * r_a * r_k).to(prompt.dtype)
    batch, (_, length, width) = q.shape[0], prompt.shape
    mixed = (weights @ prompt[:stop].reshape(stop, length * width)).view(batch, length, width)
    return mixed, weights


def weight_grads(
    q: Tensor, keys: Tensor, attn: Tensor, weights: Tensor, grad_w: Tensor, start: int, pool: int,
    need_q: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """(∂q (B, Dk) or None, ∂keys, ∂attn (M = ``pool``, Dk)) from G = ∂L/∂α (B, F) (the mix's part included);
    keys, attn are the used rows (F, Dk); rows < start and ≥ F of ∂keys/∂attn are zero."""
    ct = compute_dtype(keys.dtype)
    k, a = keys.to(ct), attn.to(ct)
    qc = q.to(ct)
    _, s2, r_a, r_k = weight_factors(q, keys, attn)
    g, w = grad_w.to(ct), weights.to(ct)
    grad_n = g * r_a * r_k
    grad_s2 = torch.where(s2.sqrt() > EPS, -0.5 * g * w * r_a * r_a, torch.zeros_like(g))
    grad_ak = grad_n.T @ qc  # ∂(A⊙K) (F, Dk)
    grad_a2 = grad_s2.T @ (qc * qc)  # ∂(A²) (F, Dk)
    unclamped = torch.linalg.vector_norm(k, dim=1) > EPS  # where r_k = 1/‖K‖ depends on K
    key_scale = torch.where(unclamped, r_k * r_k, torch.zeros_like(r_k)) * (g * w).sum(0)  # (F,)
    grad_k = grad_ak * a - k * key_scale.unsqueeze(1)
    grad_a = grad_ak * k + 2 * a * grad_a2
    grad_q = None
    if need_q:
        grad_q = (grad_n @ (a * k) + 2 * qc * (grad_s2 @ (a * a))).to(q.dtype)
    return grad_q, pad_rows(grad_k.to(keys.dtype), start, pool), pad_rows(grad_a.to(attn.dtype), start, pool)


def pad_rows(t: Tensor, start: int, pool: int) -> Tensor:
    """Rows [0, F) of a gradient → (M = ``pool``, …) with rows < start and ≥ F zero."""
    out = t.new_zeros((pool, *t.shape[1:]))
    out[start : t.shape[0]] = t[start:]
    return out


def coda_fake(q, keys, attn, prompt, start, stop):
    """Output shapes of the CODA ops: (B, Lp, D) and (B, F) in the prompt's dtype."""
    return prompt.new_empty((q.shape[0], *prompt.shape[1:])), prompt.new_empty((q.shape[0], stop))


def coda_setup(ctx, inputs, output) -> None:
    """Save q, keys, attn, prompt and α for the backward (shared by the cpu and Triton custom ops)."""
    q, keys, attn, prompt, start, stop = inputs
    ctx.save_for_backward(q, keys, attn, prompt, output[1])
    ctx.start, ctx.stop = start, stop
