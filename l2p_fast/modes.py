"""Static facts every implementation of the pool shares: the query-mode table and the compute dtype.

``QUERY_MODES`` is the one table of query modes (docs/behaviour.md §4.1): embedding_key → the integer
code the fused kernels read (``csrc/`` and ``kernels/`` switch on these codes, so they are fixed):
0 token mean, 1 token max, 2 max + 2·mean, 3 ``cls_features`` as the query. ``'cls'`` without
``cls_features`` falls back to the token max (code 1).
"""

from __future__ import annotations

import torch

QUERY_MODES: dict[str, int] = {"mean": 0, "max": 1, "mean_max": 2, "cls": 1}
QUERY_FROM_CLS = 3  # the query is cls_features ('cls' with cls_features given)
EMBEDDING_KEYS: tuple[str, ...] = tuple(QUERY_MODES)


def query_mode(embedding_key: str, has_cls_features: bool) -> int:
    """The kernels' query-mode code of ``embedding_key`` (3 when 'cls' comes with cls_features)."""
    if has_cls_features and embedding_key == "cls":
        return QUERY_FROM_CLS
    return QUERY_MODES[embedding_key]


def takes_token_max(mode: int) -> bool:
    """Whether query mode ``mode`` reduces the tokens by max (and so has a (B, D) argmax)."""
    return mode == 1 or mode == 2


def promoted_dtype(*dtypes: torch.dtype | None) -> torch.dtype:
    """The dtype ``torch.cat`` / ``+`` give their outputs: the promotion of every given dtype (None skipped)."""
    present = [d for d in dtypes if d is not None]
    result = present[0]
    for dtype in present[1:]:
        result = torch.promote_types(result, dtype)
    return result


def compute_dtype(x_dtype: torch.dtype, key_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the query and similarity stage: the promoted input dtype, never below fp32."""
    return torch.promote_types(torch.promote_types(x_dtype, key_dtype), torch.float32)
