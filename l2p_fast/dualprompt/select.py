"""E-prompt selection through the L2P pool's own fused op (docs/behaviour.md §4.1–4.4), nothing rewritten.

The registered ``pool_forward`` implementation of the chosen backend (``l2p_fast.dispatch``) computes
norms, similarity, top-K (tie rule, NaN rule), batch vote, task mask and pull term. DualPrompt has no
use for its prepended sequence, so the op is handed a stand-in that makes that output tiny: the query
goes in as ``cls_features`` (reduced from the tokens first when the mode needs them), one detached token
as ``x_embed`` and the detached keys as a one-row-per-prompt ``prompt`` (M, 1, D). Gradients reach ``keys``
and the query (then ``cls_features`` or ``x_embed``) exactly as through the pool.

The token reduction is the L2P reference's (``l2p_fast.reference.query``: torch's mean / max over the tokens,
in the compute dtype) on every backend, not the native ``query_reduce`` op: its CPU kernel walks each of the
D columns down the N tokens (stride D), and took ~5.8 ms for a (16, 197, 768) fp32 mean where ``x.mean(1)``
takes ~0.36 ms (one thread, this machine), which made the fused module's step slower than the reference's.
"""

from __future__ import annotations

from torch import Tensor

from .. import dispatch, reference
from ..modes import compute_dtype
from ..pool import global_vote_counts


def select_prompts(
    x_embed: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    batchwise: bool,
    cls_features: Tensor | None,
    prompt_mask: Tensor | None,
    backend: str,
    vote_group: object = None,
) -> dict[str, Tensor]:
    """x_embed (B, N, D), keys (M, D) → prompt_idx (B, K), prompt_key_norm (M, D), x_embed_norm (B, D),
    similarity (B, M), selected_key (B, K, D), reduce_sim () — the L2P pool's values (inputs validated).

    ``vote_group`` (None, "world" or a ProcessGroup): with the batch vote and no mask, the vote's counts are
    summed over the group first (the pool's global vote, docs/behaviour.md §9; B = 0 joins it)."""
    device_type = x_embed.device.type
    if embedding_key == "cls" and cls_features is not None:
        query = cls_features
    else:  # the reference reduction (torch's mean / max) on every backend; see the module docstring
        query = reference.query(x_embed, embedding_key, None, compute_dtype(x_embed.dtype, x_embed.dtype))
    token = x_embed[:, :1].detach()  # the prepended sequence is not used: one token keeps it tiny
    selection = {}
    if vote_group is not None and batchwise and prompt_mask is None:
        selection["vote_counts"] = global_vote_counts(
            token, keys, embedding_key="cls", top_k=top_k, cls_features=query, frequency=None, backend=backend,
            group=vote_group,
        )  # fmt: skip
    pool = dispatch.implementation("pool_forward", backend, device_type)
    out = pool(
        token,
        keys.detach().unsqueeze(1),  # stand-in prompts (M, 1, D)
        keys,
        embedding_key="cls",
        top_k=top_k,
        batchwise=batchwise,
        cls_features=query,
        prompt_mask=prompt_mask,
        **selection,
    )
    return {
        "prompt_idx": out["prompt_idx"],
        "prompt_key_norm": out["prompt_norm"],
        "x_embed_norm": out["x_embed_norm"],
        "similarity": out["similarity"],
        "selected_key": out["selected_key"],
        "reduce_sim": out["reduce_sim"],
    }
