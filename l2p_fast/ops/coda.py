"""``coda_prompt``: CODA-Prompt's component mix of one layer without materialising q ⊙ A (B, F, Dk).

q (B, Dk), keys K (M, Dk), attention A (M, Dk), prompt P (M, Lp, D); rows [0, stop) are used (F = stop), rows
[0, start) get no gradient (earlier tasks, frozen) → mixed (B, Lp, D) = Σ_m α(b, m) P_m and α (B, F):

    α = n · r_a · r_k,   n = q·(A⊙K)ᵀ,   r_a = 1 / max(√(q²·(A²)ᵀ), ε),   r_k = 1 / max(‖K_m‖, ε)   (ε = 1e-12)

(``F.normalize`` semantics, as the reference ``l2p_fast.coda.reference``). Two (B, Dk) × (Dk, F) products give
the weights; the mix is one (B, F) × (F, Lp·D) product written straight into the (B, Lp, D) layout whose first
⌊Lp/2⌋ tokens are the key prefix and the rest the value prefix (views, no copy). Backward (G = ∂L/∂α, including
the mix's g·Pᵀ):

    ∂n = G·r_a·r_k,   ∂s2 = −½·G·α·r_a² (where √s2 > ε),   ∂P = αᵀ·g,   ∂q = ∂n·(A⊙K) + 2q ⊙ (∂s2·A²)
    ∂A = (∂nᵀ q) ⊙ K + 2A ⊙ (∂s2ᵀ q²),   ∂K = (∂nᵀ q) ⊙ A − K·r_k²·Σ_b G·α (where ‖K‖ > ε)

Rows outside [start, stop) of ∂K, ∂A, ∂P are zero. Weights are computed in fp32 at least (bf16/fp16 inputs),
the mix in the prompt's dtype. Deterministic (no atomics, fixed reduction order).

- reference: ``l2p_fast.coda.reference.reference_coda_prompt`` (materialises (B, F, Dk), plain autograd; registered
  there, imported with ``l2p_fast``).
- cpu, cuda: the custom op ``l2p_fast::coda_prompt`` (PyTorch matmuls, the formulas above).
- triton: the custom op ``l2p_fast::coda_prompt_triton`` (``coda_triton.py``): the weights in one kernel, the mix,
  ∂P and G by row kernels, ∂q, ∂K, ∂A by three more (the formulas above).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import implementation, register
from . import coda_triton  # noqa: F401  (registers the Triton backend)
from .coda_math import coda_fake, coda_setup, pad_rows, torch_forward, weight_grads


def check_coda(q: Tensor, keys: Tensor, attn: Tensor, prompt: Tensor, start: int, stop: int) -> None:
    """q (B, Dk), keys, attn (M, Dk), prompt (M, Lp, D) float on one device, keys/attn/prompt one dtype;
    0 <= start < stop <= M. Raises ``ValueError`` / ``TypeError`` naming the argument."""
    for name, t, dims in (("q", q, 2), ("keys", keys, 2), ("attn", attn, 2), ("prompt", prompt, 3)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != dims:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a {dims}-D float tensor, got {got}")
    pool, key_dim = keys.shape
    if q.shape[0] < 1 or q.shape[1] != key_dim:
        raise ValueError(f"q: expected (B >= 1, Dk = {key_dim}), got {tuple(q.shape)}")
    if attn.shape != keys.shape:
        raise ValueError(f"attn: expected keys' shape {tuple(keys.shape)}, got {tuple(attn.shape)}")
    if prompt.shape[0] != pool or prompt.shape[1] < 1 or prompt.shape[2] < 1:
        raise ValueError(f"prompt: expected (M = {pool}, Lp >= 1, D >= 1), got {tuple(prompt.shape)}")
    for name, t in (("attn", attn), ("prompt", prompt), ("q", q)):
        if t.device != keys.device:
            raise ValueError(f"{name}: expected keys' device {keys.device}, got {t.device}")
    for name, t in (("attn", attn), ("prompt", prompt)):
        if t.dtype != keys.dtype:
            raise TypeError(f"{name}: expected keys' dtype {keys.dtype}, got {t.dtype}")
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not 0 <= start < stop <= pool:
        raise ValueError(f"start, stop: expected 0 <= start < stop <= M = {pool}, got start={start}, stop={stop}")


def coda_prompt(
    q: Tensor, keys: Tensor, attn: Tensor, prompt: Tensor, start: int = 0, stop: int | None = None,
    *, backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Mixed prompt (B, Lp, D) and weights α (B, F = stop) of rows [0, stop) (default M); rows [0, start) frozen.

    q (B, Dk) is cast to the parameters' dtype. Differentiable in q, keys, attn, prompt. ``backend``: 'auto',
    'reference', 'cpu', 'cuda' or 'triton' (``l2p_fast.dispatch``).
    """
    stop = keys.shape[0] if stop is None and isinstance(keys, Tensor) and keys.dim() == 2 else stop
    check_coda(q, keys, attn, prompt, start, stop)
    q = q.to(keys.dtype)
    return implementation("coda_prompt", backend, keys.device.type)(q, keys, attn, prompt, start, stop)


@torch.library.custom_op(
    "l2p_fast::coda_prompt", mutates_args=(),
    schema="(Tensor q, Tensor keys, Tensor attn, Tensor prompt, int start, int stop) -> (Tensor, Tensor)",
)  # fmt: skip
def native_coda_prompt(q: Tensor, keys: Tensor, attn: Tensor, prompt: Tensor, start: int, stop: int):
    """CODA mix by matmuls: q (B, Dk), keys, attn (M, Dk), prompt (M, Lp, D) → (mixed (B, Lp, D), α (B, F))."""
    return torch_forward(q, keys, attn, prompt, start, stop)


native_coda_prompt.register_fake(coda_fake)


def _torch_backward(ctx, grad_mixed: Tensor | None, grad_weights: Tensor | None):
    q, keys, attn, prompt, weights = ctx.saved_tensors
    start, stop = ctx.start, ctx.stop
    pool, length, width = prompt.shape
    grad_w = torch.zeros_like(weights) if grad_weights is None else grad_weights
    grad_p = prompt.new_zeros(prompt.shape) if ctx.needs_input_grad[3] else None
    if grad_mixed is not None:
        g = grad_mixed.reshape(q.shape[0], length * width).to(prompt.dtype)
        grad_w = grad_w + g @ prompt[:stop].reshape(stop, length * width).T
        if grad_p is not None:
            grad_p = pad_rows((weights.T @ g).view(stop, length, width), start, pool)
    grad_q, grad_k, grad_a = weight_grads(q, keys[:stop], attn[:stop], weights, grad_w, start, pool,
                                          ctx.needs_input_grad[0])
    return grad_q, grad_k, grad_a, grad_p, None, None


native_coda_prompt.register_autograd(_torch_backward, setup_context=coda_setup)
register("coda_prompt", "cpu", "cuda")(native_coda_prompt)
