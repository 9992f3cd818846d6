"""Pure-PyTorch references of every op: the ground truth (docs/behaviour.md §3–4) every fused kernel is held to.

The pool is written stage by stage, mirroring the fused ops: query → normalise + score → select
(tie rule, batch vote) → gather + prepend → pull term; ``assemble`` is the prompted models'
sequence assembly. Vectorised and free of host synchronisation (no ``torch.unique``, no
``.item()``, no data-dependent shapes), so they are also the ``torch.compile`` baselines.
Given ids (``prompt_mask``, ``assemble``'s ``idx``) are clamped to [0, M − 1], as every backend
does where the eager value check is skipped (see ``l2p_fast.validation.check_ids``).
Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .modes import EMBEDDING_KEYS, compute_dtype

SQUARED_NORM_EPS = 1e-12


def query(x_embed: Tensor, embedding_key: str, cls_features: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Query of each sample (docs/behaviour.md §4.1): x_embed (B, N, D) → (B, D) in ``dtype``.

    ``mean``: token mean; ``max``: token max; ``mean_max``: max + 2·mean; ``cls``: ``cls_features``
    (B, D) when given, else the token max.
    """
    if embedding_key == "cls" and cls_features is not None:
        return cls_features.to(dtype)
    if embedding_key == "mean":
        return x_embed.mean(dim=1, dtype=dtype)
    token_max = torch.max(x_embed, dim=1).values.to(dtype)
    if embedding_key in ("max", "cls"):
        return token_max
    if embedding_key == "mean_max":
        return token_max + 2 * x_embed.mean(dim=1, dtype=dtype)
    raise ValueError(f"embedding_key: expected one of {EMBEDDING_KEYS}, got {embedding_key!r}")


def l2_normalize(v: Tensor) -> Tensor:
    """Row-wise ``v · rsqrt(max(Σ v², 1e-12))`` over the last dim (clamp on the squared norm)."""
    return v * torch.rsqrt(v.pow(2).sum(dim=-1, keepdim=True).clamp_min(SQUARED_NORM_EPS))


def score(q: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise queries (B, D) and keys (M, D); return (x_embed_norm, prompt_norm, similarity (B, M))."""
    x_embed_norm = l2_normalize(q)
    prompt_norm = l2_normalize(keys.to(q.dtype))
    return x_embed_norm, prompt_norm, x_embed_norm @ prompt_norm.t()


def penalised_score(similarity: Tensor, frequency: Tensor) -> Tensor:
    """Diversified selection's score (docs/behaviour.md §8): ``-max(1 − similarity, 0) · frequency``.

    similarity (B, M), frequency (M,) → (B, M): the paper's cosine distance weighted by each prompt's
    selection frequency, negated so that larger ranks first. A NaN similarity gives NaN (clamp_min keeps it).
    """
    distance = (1 - similarity).clamp_min(0)
    return -(distance * frequency.to(similarity.dtype))


def top_k_ids(similarity: Tensor, top_k: int, frequency: Tensor | None = None) -> Tensor:
    """Per-row top-K ids (B, K) by descending similarity; equal values → lower id first.

    With ``frequency`` (M,) (the diversified selection, §8) the order is by ``penalised_score`` first,
    then by similarity, then by id: zero frequencies give the plain order."""
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    if frequency is not None:
        penalised = penalised_score(similarity, frequency).gather(1, order)
        order = order.gather(1, torch.sort(penalised, dim=1, descending=True, stable=True).indices)
    return order[:, :top_k]


def vote_counts(idx: Tensor, pool_size: int) -> Tensor:
    """counts (M,) int64: how many rows of idx (B, K) hold each prompt id (a fixed-size count, no sync)."""
    counts = torch.zeros(pool_size, dtype=torch.int64, device=idx.device)
    return counts.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1)))


def vote_winners(counts: Tensor, batch: int, top_k: int) -> Tensor:
    """The K ids with the most votes (count descending, equal counts → lower id first), for every row (B, K)."""
    winners = torch.sort(counts, descending=True, stable=True).indices[:top_k]
    return winners.unsqueeze(0).expand(batch, top_k)


def batch_vote(idx: Tensor, pool_size: int, top_k: int) -> Tensor:
    """The batch's K most voted ids, every row the same list (B, K).

    Counts how many rows hold each id in their top-K (a fixed-size count over M ids, no sync);
    winners ordered by count descending, equal counts → lower id first.
    """
    return vote_winners(vote_counts(idx, pool_size), idx.shape[0], top_k)


def select(
    similarity: Tensor,
    top_k: int,
    batchwise: bool,
    prompt_mask: Tensor | None,
    frequency: Tensor | None = None,
    counts: Tensor | None = None,
) -> Tensor:
    """Prompt ids (B, K) per docs/behaviour.md §4.3, §8, §9.

    The mask (clamped to [0, M − 1]) if given, else top-K (diversified by ``frequency`` (M,) when given)
    and, with ``batchwise``, the batch vote — on the given vote ``counts`` (M,) when given (the global vote)."""
    if prompt_mask is not None:
        return prompt_mask.to(torch.int64).clamp(0, similarity.shape[1] - 1)
    if batchwise and counts is not None:
        return vote_winners(counts.to(torch.int64), similarity.shape[0], top_k)
    idx = top_k_ids(similarity, top_k, frequency)
    if batchwise:
        idx = batch_vote(idx, similarity.shape[1], top_k)
    return idx


def gather_prepend(prompt: Tensor, idx: Tensor, x_embed: Tensor) -> Tensor:
    """``cat([prompt[idx] as (B, K·Lp, D), x_embed (B, N, D)], 1)`` → (B, K·Lp + N, D)."""
    batch, k = idx.shape
    batched_prompt = prompt[idx].reshape(batch, k * prompt.shape[1], prompt.shape[2])
    return torch.cat([batched_prompt, x_embed], dim=1)


def prepend(prompt: Tensor, x_embed: Tensor) -> Tensor:
    """Non-pool mode: the single prompt (Lp, D) before every sample's tokens → (B, Lp + N, D)."""
    batched_prompt = prompt.unsqueeze(0).expand(x_embed.shape[0], -1, -1)
    return torch.cat([batched_prompt, x_embed], dim=1)


def pull_term(prompt_norm: Tensor, x_embed_norm: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """selected_key (B, K, D) and reduce_sim = Σ_b Σ_k ⟨selected_key[b,k], x_embed_norm[b]⟩ / B."""
    selected_key = prompt_norm[idx]
    reduce_sim = (selected_key * x_embed_norm.unsqueeze(1)).sum() / x_embed_norm.shape[0]
    return selected_key, reduce_sim


def pool_forward(
    x_embed: Tensor,
    prompt: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    batchwise: bool,
    cls_features: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    frequency: Tensor | None = None,
    vote_counts: Tensor | None = None,
) -> dict[str, Tensor]:
    """The whole pool-mode forward (docs/behaviour.md §4): every tensor output of §4.5.

    x_embed (B, N, D), prompt (M, Lp, D), keys (M, D), cls_features (B, D) or None,
    prompt_mask (B, K') or None, frequency (M,) float or None (diversified selection, §8),
    vote_counts (M,) int or None (the batch vote's counts, given: the global vote, §9).
    Inputs are assumed validated (``l2p_fast.validation``).
    """
    dtype = compute_dtype(x_embed.dtype, keys.dtype)
    q = query(x_embed, embedding_key, cls_features, dtype)
    x_embed_norm, prompt_norm, similarity = score(q, keys)
    idx = select(similarity, top_k, batchwise, prompt_mask, frequency, vote_counts)
    selected_key, reduce_sim = pull_term(prompt_norm, x_embed_norm, idx)
    return {
        "prompt_idx": idx,
        "prompt_norm": prompt_norm,
        "x_embed_norm": x_embed_norm,
        "similarity": similarity,
        "selected_key": selected_key,
        "reduce_sim": reduce_sim,
        "prompted_embedding": gather_prepend(prompt, idx, x_embed),
    }


def pool_vote_counts(
    x_embed: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    cls_features: Tensor | None = None,
    frequency: Tensor | None = None,
) -> Tensor:
    """The local half of the global vote (§9): counts (M,) int64 of the rows of x_embed (B, N, D) holding
    each prompt among their top-K (diversified by ``frequency`` (M,) when given). keys (M, D). No gradient."""
    with torch.no_grad():
        dtype = compute_dtype(x_embed.dtype, keys.dtype)
        _, _, similarity = score(query(x_embed, embedding_key, cls_features, dtype), keys)
        return vote_counts(top_k_ids(similarity, top_k, frequency), keys.shape[0])


def assemble_reference(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    """The port's way: ``cat([cls, prompt[idx] as (B, K·Lp, D), x], 1) + pos`` → (B, 1 + K·Lp + N, D).

    x (B, N, D), prompt (M, Lp, D), idx (B, K) int64 in [0, M), cls (1 | B, 1, D), pos (1, S, D) or None.
    """
    batch, k = idx.shape
    batched_prompt = prompt[idx].reshape(batch, k * prompt.shape[1], prompt.shape[2])
    seq = torch.cat([batched_prompt, x], dim=1)
    seq = torch.cat([cls.expand(batch, -1, -1), seq], dim=1)
    return seq if pos is None else seq + pos


def assemble(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    """The reference backend of the assembly: ``assemble_reference`` with ids clamped to [0, M − 1]."""
    return assemble_reference(x, prompt, idx.clamp(0, prompt.shape[0] - 1), cls, pos)
