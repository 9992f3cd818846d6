"""Plain-PyTorch CODA-Prompt (Smith et al., CVPR 2023) from the paper's equations: the truth the fused op is tested on.

Per prompted layer: components P (M, Lp, D), keys K (M, Dk), attention vectors A (M, Dk); query q (B, Dk).

- weights α(b, m) = cos(q_b ⊙ A_m, K_m), each factor normalised as ``F.normalize`` (the norm clamped at 1e-12);
  no softmax, no top-K, the weights may be negative.
- prompt_b = Σ_m α(b, m) P_m (B, Lp, D), split into a key prefix (the first ⌊Lp/2⌋ tokens) and a value prefix.
- task slicing: ``pt = ⌊M / T⌋`` rows per task; task t trains rows [t·pt, (t+1)·pt), the rows of earlier tasks are
  used but detached, rows ≥ (t+1)·pt are unused; evaluation uses rows [0, (t+1)·pt), all with gradient.
- orthogonality loss μ·(op(K) + op(A) + op(P as (F, Lp·D))), op(T) = mean((T Tᵀ − I)²), on the used rows (the
  detached ones included); a tensor 0 when off.
- Gram–Schmidt initialisation of a task's rows: fresh Gaussian rows orthogonalised against every lower row (one
  classical pass on the flattened rows), then normalised; earlier rows kept, later rows zero.

This module materialises (B, F, Dk), as the paper's formula reads; ``l2p_fast.ops.coda`` does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import register

NORM_EPS = 1e-12  # F.normalize's clamp of the norm


def task_rows(pool_size: int, n_tasks: int, task: int) -> tuple[int, int]:
    """(s, f): task ``task``'s trainable rows are [s, f) with pt = ⌊M / T⌋ rows per task."""
    per_task = pool_size // n_tasks
    return task * per_task, (task + 1) * per_task


def slice_rows(t: Tensor, start: int, stop: int, train: bool) -> Tensor:
    """Rows [0, stop) of ``t``; in training rows [0, start) detached (earlier tasks are frozen)."""
    if train and start > 0:
        return torch.cat([t[:start].detach(), t[start:stop]], dim=0)
    return t[:stop]


def coda_weights(q: Tensor, keys: Tensor, attn: Tensor) -> Tensor:
    """α (B, F) = cos(q ⊙ A, K): q (B, Dk), keys, attn (F, Dk); materialises q ⊙ A (B, F, Dk)."""
    aq = F.normalize(q.unsqueeze(1) * attn.unsqueeze(0), dim=2, eps=NORM_EPS)
    return torch.einsum("bkd,kd->bk", aq, F.normalize(keys, dim=1, eps=NORM_EPS))


def coda_prompt(q: Tensor, keys: Tensor, attn: Tensor, prompt: Tensor, start: int, stop: int) -> Tensor:
    """The sliced mix: rows [0, stop) of keys, attn (M, Dk), prompt (M, Lp, D) used, rows [0, start) detached.

    q (B, Dk) → (B, Lp, D). ``start`` = 0 for evaluation (every used row trainable).
    """
    return reference_coda_prompt(q, keys, attn, prompt, start, stop)[0]


@register("coda_prompt", "reference")
def reference_coda_prompt(
    q: Tensor, keys: Tensor, attn: Tensor, prompt: Tensor, start: int, stop: int
) -> tuple[Tensor, Tensor]:
    """The op's reference backend: (mixed (B, Lp, D), α (B, F)) by the formula, rows [0, start) detached."""
    k, a, p = (slice_rows(t, start, stop, True) for t in (keys, attn, prompt))
    weights = coda_weights(q, k, a)
    return torch.einsum("bk,kld->bld", weights, p), weights


def split_prefix(mixed: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Lp, D) → key prefix (B, ⌊Lp/2⌋, D), value prefix (B, Lp − ⌊Lp/2⌋, D) (views)."""
    half = mixed.shape[1] // 2
    return mixed[:, :half], mixed[:, half:]


def ortho_penalty(t: Tensor) -> Tensor:
    """mean((T Tᵀ − I)²) of T (F, R)."""
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    return ((t @ t.T - eye) ** 2).mean()


def ortho_loss(keys: Tensor, attn: Tensor, prompt: Tensor, mu: float) -> Tensor:
    """μ·(op(K) + op(A) + op(P reshaped (F, Lp·D))) of the used (sliced) rows; a tensor 0 when μ = 0."""
    if not mu:
        return keys.new_zeros(())
    return mu * (ortho_penalty(keys) + ortho_penalty(attn) + ortho_penalty(prompt.reshape(prompt.shape[0], -1)))


@torch.no_grad()
def gram_schmidt_rows(t: Tensor, start: int, stop: int, generator: torch.Generator | None = None) -> Tensor:
    """A copy of ``t`` (M, …) with rows [start, stop) fresh Gaussian, orthogonalised against every lower row by one
    classical Gram–Schmidt pass on the flattened rows and normalised; rows [0, start) kept, rows ≥ stop zero.

    A fresh row whose projection basis holds a (near-)zero row skips that row (it adds no direction). Raises
    ``ValueError`` when the rows cannot be orthonormal (stop > the flattened row width).
    """
    rows = t.reshape(t.shape[0], -1)
    width = rows.shape[1]
    if not 0 <= start <= stop <= rows.shape[0]:
        raise ValueError(f"start, stop: expected 0 <= start <= stop <= M = {rows.shape[0]}, got {start}, {stop}")
    if stop > width:
        raise ValueError(f"pool_size: {stop} orthonormal rows need a row width >= {stop}, got {width}")
    out = torch.zeros_like(rows, dtype=torch.float64)
    out[:start] = rows[:start].double()
    for k in range(start, stop):
        v = torch.randn(width, dtype=torch.float64, generator=generator).to(rows.device)
        basis = out[:k]
        norms = (basis * basis).sum(1)
        keep = norms >= 1e-8
        coef = torch.where(keep, (basis @ v) / norms.clamp_min(1e-8), torch.zeros_like(norms))
        u = v - coef @ basis
        out[k] = u / u.norm()
    return out.to(t.dtype).view_as(t)
