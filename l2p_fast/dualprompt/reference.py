"""Plain-PyTorch references of DualPrompt (Wang et al., ECCV 2022), written from the paper's equations.

The E-prompt pool selects exactly as the L2P pool (docs/behaviour.md §4.1–4.4: query, ``l2n``,
cosine similarity, top-K with the tie rule, batch vote, task mask, pull term); those stages are the
L2P reference's own functions (``l2p_fast.reference``), not a second copy. What DualPrompt adds:

- **Prefix-tuning** (the paper's default): the pool ``prompt`` is (L, 2, M, Lp, H, Dh), a key half
  (kv = 0) and a value half (kv = 1) per layer and prompt. Layer l's prefix of sample b is its K
  selected prompts' halves concatenated in selection order: (L, B, 2, K·Lp, H, Dh) with
  ``out[l, b, kv, j·Lp + t] = prompt[l, kv, idx[b, j], t]`` (``layout='permute'``, the correct one).
- **Prompt-tuning**: ``prompt`` (L, M, Lp, D) gathered to (L, B, K·Lp, D) (tokens prepended, as L2P).
- ``layout='port'`` reproduces the DualPrompt port's reshape (it gathers (L, 2, B, K, Lp, H, Dh) and
  reshapes without moving the batch axis): ``port[l, b, c] = permute[l, (2b + c) mod B, (2b + c) div B]``.
  Samples and key/value halves mix whenever B > 1. Only for matching numbers published with the port.
- **Prefix attention**: softmax(q [k_p; k]ᵀ · scale) [v_p; v], the prefix keys/values in front of the
  layer's own (the port's concat).

Shapes: B batch, N tokens, D width, H heads, Dh = D / H, M pool, K top-k, Lp prompt length,
L E-prompt layers, P prefix length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference as l2p
from ..modes import compute_dtype

LAYOUTS: tuple[str, ...] = ("permute", "port")


def gather_prompts(prompt: Tensor, idx: Tensor, layout: str = "permute") -> Tensor:
    """The selected prompts of every layer in the layout the blocks read.

    prompt (L, 2, M, Lp, H, Dh) → (L, B, 2, K·Lp, H, Dh) (prefix-tuning), or (L, M, Lp, D) →
    (L, B, K·Lp, D) (prompt-tuning; both layouts agree); idx (B, K) int64 in [0, M).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    batch, k = idx.shape
    if prompt.dim() == 4:
        layers, _, length, width = prompt.shape
        return prompt[:, idx].reshape(layers, batch, k * length, width)
    layers, dual, _, length, heads, head_dim = prompt.shape
    raw = prompt[:, :, idx]  # (L, 2, B, K, Lp, H, Dh)
    if layout == "permute":
        raw = raw.permute(0, 2, 1, 3, 4, 5, 6)  # (L, B, 2, K, Lp, H, Dh)
    return raw.reshape(layers, batch, dual, k * length, heads, head_dim)


def eprompt_forward(
    x_embed: Tensor,
    prompt: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    batchwise: bool,
    cls_features: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    layout: str = "permute",
) -> dict[str, Tensor]:
    """The E-prompt pool's forward: x_embed (B, N, D), prompt (L, 2, M, Lp, H, Dh) or (L, M, Lp, D),
    keys (M, D) → prompt_idx (B, K), similarity (B, M), selected_key (B, K, D), prompt_key_norm (M, D),
    x_embed_norm (B, D), reduce_sim (), batched_prompt (``gather_prompts``)."""
    dtype = compute_dtype(x_embed.dtype, keys.dtype)
    q = l2p.query(x_embed, embedding_key, cls_features, dtype)
    x_embed_norm, prompt_key_norm, similarity = l2p.score(q, keys)
    idx = l2p.select(similarity, top_k, batchwise, prompt_mask)
    selected_key, reduce_sim = l2p.pull_term(prompt_key_norm, x_embed_norm, idx)
    return {
        "prompt_idx": idx,
        "similarity": similarity,
        "selected_key": selected_key,
        "prompt_key_norm": prompt_key_norm,
        "x_embed_norm": x_embed_norm,
        "reduce_sim": reduce_sim,
        "batched_prompt": gather_prompts(prompt, idx, layout),
    }


def prefix_attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None, scale: float,
    key_mask: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """softmax(q [prefix_k; k]ᵀ · scale) [prefix_v; v] → (B, H, N, Dh), by the port's concat.

    q, k, v (B, H, N, Dh); prefix_k, prefix_v (1 | B, H, P, Dh) or None (plain attention); key_mask (B, N)
    bool or None: False keys get −inf scores (the prefix is always attended).
    """
    batch = q.shape[0]
    if key_mask is not None:
        key_mask = key_mask[:, None, None, :]
    if prefix_k is not None:
        k = torch.cat([prefix_k.expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix_v.expand(batch, -1, -1, -1), v], dim=2)
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(batch, 1, 1, prefix_k.shape[2]), key_mask], dim=-1)
    scores = q @ k.transpose(-2, -1) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v
