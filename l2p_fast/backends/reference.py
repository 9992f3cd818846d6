"""The reference backend: plain PyTorch autograd on any device."""

from __future__ import annotations

from ..reference import pool_forward, prepend

__all__ = ["pool_forward", "prepend", "unavailable_reason"]


def unavailable_reason(name: str, device_type: str) -> str | None:
    """The reference runs wherever PyTorch does."""
    return None
