"""Loads the compiled extension ``l2p_fast._C`` if it was built; records why not otherwise."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

try:
    from . import _C  # noqa: F401  (importing registers the torch.ops.l2p_fast kernels)

    LOAD_ERROR: str | None = None
except ImportError as error:
    _C = None
    LOAD_ERROR = (
        f"l2p_fast._C is not built ({error}); build it with `pip install --no-build-isolation -e .`"
    )
    logger.debug(LOAD_ERROR)


def is_built() -> bool:
    """Whether the native extension imported."""
    return _C is not None


def built_with_cuda() -> bool:
    """Whether the native extension carries the CUDA kernels."""
    return _C is not None and bool(_C.built_with_cuda())


def has_op(name: str) -> bool:
    """Whether the extension registered ``torch.ops.l2p_fast.<name>``."""
    return _C is not None and hasattr(torch.ops.l2p_fast, name)
