"""The reuse cache of large CPU outputs of the native kernels (``csrc/cpu/output_cache.cpp``).

On the CPU, glibc returns big freed blocks to the kernel, so a fresh (B, K·Lp + N, D) output costs
page faults and zeroing on every call — more than writing it. The native ops take their large
outputs (≥ 256 KiB: the prompted sequence, the assembled sequence, token gradients) from a small
cache of blocks released by earlier outputs. Unused blocks stay below a limit (default 1024 MB, or
``L2P_FAST_CPU_CACHE_MB``, an integer in [0, 2**43); 0 turns the cache off), oldest freed first. Live
tensors are reported to PyTorch's memory profiler like any CPU allocation.

Outputs larger than half the last-level cache are written with streaming (non-temporal) stores: they
would be evicted before anyone reads them, and regular stores would first read every destination line
into the cache. ``set_cpu_stream_threshold`` moves that size.
"""

from __future__ import annotations

import math

from . import _native


def _extension():
    if not _native.is_built():
        raise RuntimeError(f"the CPU output cache belongs to the native extension: {_native.LOAD_ERROR}")
    return _native._C


def cpu_cache_stats() -> dict[str, int]:
    """Counters: limit_bytes, cached_bytes (unused, held), cached_blocks, in_use_bytes, hits, misses."""
    return dict(_extension().cpu_output_cache_stats())


def empty_cpu_cache() -> None:
    """Free every unused block (blocks of live tensors come back when those tensors die)."""
    _extension().cpu_output_cache_clear()


# The byte count of the limit is an int64 in the extension: at most 2**63 - 1 bytes, i.e. below 2**43 MB.
MAX_CACHE_MB = 2**43


def set_cpu_cache_limit(megabytes: float) -> None:
    """Keep at most ``megabytes`` (a number in [0, 2**43)) of unused blocks (0: off, every output is a fresh
    allocation)."""
    if (
        isinstance(megabytes, bool)
        or not isinstance(megabytes, int | float)
        or not math.isfinite(megabytes)
        or not 0 <= megabytes < MAX_CACHE_MB
    ):
        raise ValueError(f"megabytes: expected a finite number in [0, 2**43), got {megabytes!r}")
    _extension().cpu_output_cache_set_limit(int(megabytes * 2**20))


def cpu_stream_threshold() -> int:
    """Bytes from which the native CPU kernels write an output with streaming stores."""
    return int(_extension().cpu_stream_threshold())


def set_cpu_stream_threshold(megabytes: float | None) -> None:
    """Write outputs of at least ``megabytes`` with streaming stores (0: every output; ``None``: the default,
    half the last-level cache the OS reports, or 16 MiB)."""
    if megabytes is None:
        _extension().cpu_set_stream_threshold(-1)
        return
    if isinstance(megabytes, bool) or not isinstance(megabytes, int | float) or not 0 <= megabytes < 2**40:
        raise ValueError(f"megabytes: expected a number in [0, 2**40) or None, got {megabytes!r}")
    _extension().cpu_set_stream_threshold(int(megabytes * 2**20))
