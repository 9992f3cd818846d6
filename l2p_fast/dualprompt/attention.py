"""Attention with prefix keys/values (DualPrompt's prefix-tuning) that never concatenates the layer's own k/v.

The port computes ``softmax(q [k_p; k]ᵀ·s) [v_p; v]`` by ``torch.cat`` of the prefix (B, H, P, Dh) in front
of the token keys and values (B, H, N, Dh): two fresh (B, H, P + N, Dh) copies per layer. Here the tokens
are attended by the fused SDPA kernel, which also returns the log-sum-exp of each query row, the short
prefix by hand, and the two are merged with the log-sum-exp rule:

    lse = logaddexp(lse_t, lse_p),  out = exp(lse_t − lse)·out_t + Σ_p exp(s_p − lse)·v_p

The backward is the flash-attention one written against the merged (out, lse): the token part is the
SDPA backward kernel called with the merged output and log-sum-exp (which is exactly its gradient inside
the joint softmax), the prefix part by hand. A prefix of batch 1 (the shared G-prompt) is broadcast,
never copied. Forward and backward are deterministic.

- CPU tensors: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its ``_backward``), which return
  and take the log-sum-exp.
- Other devices: the token part by hand (the math path); a fused kernel with log-sum-exp there is not
  wired yet (docs/design/dualprompt.md).
Shapes: B batch, H heads, N tokens, P prefix length, Dh head width, D = H·Dh.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .reference import prefix_attention as reference_prefix_attention


def fused_lse(device_type: str) -> bool:
    """Whether the token part runs the fused SDPA kernel that returns the log-sum-exp (CPU tensors)."""
    return device_type == "cpu"


def additive_mask(key_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """key_mask (B, N) bool, True = attend → additive (B, 1, 1, N) mask in ``dtype`` (0 / −inf), or None."""
    if key_mask is None:
        return None
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill_(
        ~key_mask, float("-inf"))[:, None, None, :]  # fmt: skip


def _token_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention of q (B, H, N, Dh) over the tokens k, v (B, H, N, Dh) → (out (B, H, N, Dh), lse (B, H, N));
    ``mask``: additive (B, 1, 1, N) or None."""
    if fused_lse(q.device.type):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
        if mask is not None:  # a row without a valid token: the kernel gives out 0 and lse 0; its lse is −inf
            lse = lse.masked_fill(torch.isinf(mask).all(-1), float("-inf"))
        return out, lse
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    finite = lse.masked_fill(lse == float("-inf"), 0.0)  # a row without a valid token: out 0, not NaN
    return torch.exp(scores - finite.unsqueeze(-1)) @ v, lse


def _token_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Grads of q, k, v for the token part of a joint softmax whose (merged) output and lse are given."""
    if fused_lse(q.device.type):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale
        )
    scores = (q @ k.transpose(-2, -1)) * scale
    probs = torch.exp((scores if mask is None else scores + mask) - lse.unsqueeze(-1))
    delta = (grad * out).sum(-1, keepdim=True)
    grad_scores = probs * (grad @ v.transpose(-2, -1) - delta)
    return grad_scores @ k * scale, grad_scores.transpose(-2, -1) @ q * scale, probs.transpose(-2, -1) @ grad


def _sum_to(t: Tensor, batch: int) -> Tensor:
    """Sum a (B, …) gradient over the batch when the input was broadcast from batch 1."""
    return t.sum(0, keepdim=True) if batch == 1 and t.shape[0] != 1 else t


def _prefix_scores(q: Tensor, prefix_k: Tensor, scale: float) -> Tensor:
    """q (B, H, N, Dh) against the prefix keys (1 | B, H, P, Dh) → scaled scores (B, H, N, P)."""
    return torch.matmul(q, prefix_k.transpose(-2, -1)).mul_(scale)


class _PrefixAttention(torch.autograd.Function):
    """Forward: the token output of the fused kernel is rescaled and the prefix part added in place, so the result
    keeps the kernel's memory layout ((B, N, H, Dh) on the CPU: the caller's ``transpose(1, 2).reshape`` is then
    free, as after SDPA); the prefix probabilities (B, H, N, P) are saved, not recomputed from q. Backward: parts
    whose inputs need no gradient are skipped (the first prefix layer of a frozen ViT needs only the prefix's)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, scale, mask):
        out, lse_t = _token_forward(q, k, v, scale, mask)
        scores_p = _prefix_scores(q, prefix_k, scale)  # (B, H, N, P)
        lse = torch.logaddexp(lse_t, torch.logsumexp(scores_p, dim=-1))
        probs_p = scores_p.sub_(lse.unsqueeze(-1)).exp_()
        # out = exp(lse_t - lse)·out_t + probs_p @ prefix_v, written into the token output (ours, fresh)
        torch.addcmul(torch.matmul(probs_p, prefix_v), out, (lse_t - lse).exp_().unsqueeze(-1), out=out)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, probs_p)  # probs_p: P ≪ Dh columns
        ctx.scale, ctx.mask = scale, mask
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, prefix_k, prefix_v, out, lse, probs_p = ctx.saved_tensors
        scale, mask = ctx.scale, ctx.mask
        need_q, need_k, need_v, need_pk, need_pv = ctx.needs_input_grad[:5]
        grad_q = grad_k = grad_v = grad_pk = grad_pv = None
        if need_q or need_k or need_v:
            grad_q, grad_k, grad_v = _token_backward(grad, q, k, v, out, lse, scale, mask)
        if not (need_q or need_pk or need_pv):
            return grad_q, grad_k, grad_v, None, None, None, None
        if need_q or need_pk:
            delta = torch.linalg.vecdot(grad, out).unsqueeze(-1)  # (B, H, N, 1)
            grad_scores_p = (torch.matmul(grad, prefix_v.transpose(-2, -1)).sub_(delta)).mul_(probs_p).mul_(scale)
            if need_q:
                grad_q = grad_q.add_(torch.matmul(grad_scores_p, prefix_k))
            if need_pk:
                grad_pk = _sum_to(torch.matmul(grad_scores_p.transpose(-2, -1), q), prefix_k.shape[0])
        if need_pv:
            grad_pv = _sum_to(torch.matmul(probs_p.transpose(-2, -1), grad), prefix_v.shape[0])
        return grad_q, grad_k, grad_v, grad_pk, grad_pv, None, None


def prefix_attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None, scale: float | None = None,
    *, key_mask: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """softmax(q [prefix_k; k]ᵀ·scale) [prefix_v; v] → (B, H, N, Dh) without concatenating k, v.

    q, k, v (B, H, N, Dh); prefix_k, prefix_v (1 | B, H, P, Dh) or both None (plain SDPA); scale defaults
    to Dh^-1/2; ``key_mask`` (B, N) bool, False = a padded token no query attends (the prefix is always
    attended). Differentiable once in q, k, v and the prefix.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k, prefix_v: expected both or neither, got one of them")
    batch, heads, _, head_dim = q.shape
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (batch, k.shape[2])):
        raise ValueError(f"key_mask: expected a bool (B, N) = ({batch}, {k.shape[2]}) tensor, "
                         f"got {key_mask.dtype} {tuple(key_mask.shape)}")
    if prefix_k is None:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dim() != 4 or t.shape[0] not in (1, batch) or t.shape[1] != heads or t.shape[3] != head_dim:
            expected = f"(1 | B, H, P, Dh) = (1 | {batch}, {heads}, P, {head_dim})"
            raise ValueError(f"{name}: expected {expected}, got {tuple(t.shape)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_v: expected prefix_k's shape {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}")
    if prefix_k.dtype != q.dtype:  # fp32 prompts meet autocast's bf16/fp16 q, k, v: the prefix follows q
        prefix_k, prefix_v = prefix_k.to(q.dtype), prefix_v.to(q.dtype)
    return _PrefixAttention.apply(q, k, v, prefix_k, prefix_v, scale, additive_mask(key_mask, q.dtype))


class PrefixAttention(nn.Module):
    """Drop-in for the DualPrompt port's ``PreT_Attention``: same constructor, parameter names (``qkv``,
    ``proj``) and ``forward(x, prompt)``; the prefix is attended by ``prefix_attention`` (no concat).

    x (B, N, D); prompt (1 | B, 2, P, H, Dh) (key half, value half) or None → (B, N, D). With attention
    dropout active (``attn_drop > 0`` in training) it takes the port's concat path.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of dim={dim}, got {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, prompt: Tensor | None = None) -> Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        prefix_k = prefix_v = None
        if prompt is not None:
            prefix = prompt.permute(1, 0, 3, 2, 4)  # (2, B, H, P, Dh), a view
            prefix_k, prefix_v = prefix[0], prefix[1]
        if self.training and self.attn_drop.p > 0:
            attn = (q @ torch.cat([prefix_k.expand(batch, -1, -1, -1), k], 2).transpose(-2, -1) * self.scale
                    if prefix_k is not None else q @ k.transpose(-2, -1) * self.scale)
            attn = self.attn_drop(attn.softmax(dim=-1))
            values = torch.cat([prefix_v.expand(batch, -1, -1, -1), v], 2) if prefix_v is not None else v
            out = attn @ values
        else:
            out = prefix_attention(q, k, v, prefix_k, prefix_v, self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj_drop(self.proj(out))


__all__ = ["PrefixAttention", "prefix_attention", "reference_prefix_attention"]
