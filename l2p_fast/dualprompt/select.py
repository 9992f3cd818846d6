"""E-prompt selection through the L2P pool's own fused op (docs/behaviour.md §4.1–4.4), nothing rewritten.

The registered ``pool_forward`` implementation of the chosen backend (``l2p_fast.dispatch``) computes
norms, similarity, top-K (tie rule, NaN rule), batch vote, task mask and pull term. DualPrompt has no
use for its prepended sequence, so the op is handed a stand-in that makes that output tiny: the query
goes in as ``cls_features`` (reduced from the tokens first by the ``query_reduce`` op when the mode
needs the tokens), one detached token as ``x_embed`` and the detached keys as a one-row-per-prompt
``prompt`` (M, 1, D). Gradients reach ``keys`` and the query (then ``cls_features`` or ``x_embed``)
exactly as through the pool.
"""

from __future__ import annotations

from torch import Tensor

from .. import dispatch


def _query_backend(backend: str, device_type: str) -> str:
    """The backend of the token reduction: the requested one where it has ``query_reduce``, else the reference."""
    name = dispatch.resolve("pool_forward", backend, device_type)
    return name if dispatch.unavailable_reason(name, device_type, "query_reduce") is None else "reference"


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
) -> dict[str, Tensor]:
    """x_embed (B, N, D), keys (M, D) → prompt_idx (B, K), prompt_key_norm (M, D), x_embed_norm (B, D),
    similarity (B, M), selected_key (B, K, D), reduce_sim () — the L2P pool's values (inputs validated)."""
    device_type = x_embed.device.type
    if embedding_key == "cls" and cls_features is not None:
        query = cls_features
    else:
        reduce = dispatch.implementation("query_reduce", _query_backend(backend, device_type), device_type)
        query = reduce(x_embed, "max" if embedding_key == "cls" else embedding_key)
    pool = dispatch.implementation("pool_forward", backend, device_type)
    out = pool(
        x_embed[:, :1].detach(),  # the prepended sequence is not used: one token keeps it tiny
        keys.detach().unsqueeze(1),  # stand-in prompts (M, 1, D)
        keys,
        embedding_key="cls",
        top_k=top_k,
        batchwise=batchwise,
        cls_features=query,
        prompt_mask=prompt_mask,
    )
    return {
        "prompt_idx": out["prompt_idx"],
        "prompt_key_norm": out["prompt_norm"],
        "x_embed_norm": out["x_embed_norm"],
        "similarity": out["similarity"],
        "selected_key": out["selected_key"],
        "reduce_sim": out["reduce_sim"],
    }
