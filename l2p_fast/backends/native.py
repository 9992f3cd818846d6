"""The native backend: C++ kernels of ``l2p_fast._C`` on CPU tensors ('cpu') and CUDA tensors ('cuda').

``pool_forward`` runs the fused op ``l2p_fast::pool_forward`` (and its backward op); see
``l2p_fast.ops`` for the fakes and autograd and ``csrc/`` for the kernels.
"""

from __future__ import annotations

import torch

from .. import _native, ops
from .. import reference as ref

NATIVE_POOL_OP = "pool_forward"

__all__ = ["pool_forward", "prepend", "query", "unavailable_reason"]


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why the native backend ``name`` ('cpu' or 'cuda') cannot run on ``device_type``."""
    if device_type != name:
        return f"backend {name!r} runs on {name!r} tensors, got {device_type!r} tensors"
    if not _native.is_built():
        return _native.LOAD_ERROR
    if name == "cuda" and not _native.built_with_cuda():
        return "l2p_fast._C was built without CUDA (torch without CUDA or nvcc not found at build time)"
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if not hasattr(torch.ops.l2p_fast, NATIVE_POOL_OP):
        return f"l2p_fast._C has no fused op l2p_fast::{NATIVE_POOL_OP} yet"
    return None


def query(x_embed: torch.Tensor, embedding_key: str) -> torch.Tensor:
    """Query (B, D) from tokens (B, N, D) by the native reduction ('mean', 'max', 'mean_max')."""
    return ops.query_reduce(x_embed, embedding_key)


pool_forward = ops.pool_forward
prepend = ref.prepend
