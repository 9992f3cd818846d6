"""Mixed precision of a training or evaluation step: which precision, its autocast, its loss scaler.

``fp32`` runs as written; ``bf16`` and ``fp16`` run the frozen query pass and the prompted forward
under ``torch.autocast`` with that dtype, while every parameter (prompts, keys, head, the frozen
backbone) and the optimiser state stay fp32, and the pool computes its similarities and the pull
term in fp32 (the models turn autocast off around it). ``fp16`` also needs loss scaling
(:func:`grad_scaler`). ``auto`` picks ``bf16`` where the hardware runs it natively (CUDA compute
capability 8.0 or newer; an x86 CPU with AVX512-BF16 or AMX) and ``fp32`` elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def check_precision(precision: object) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ``ValueError`` naming the argument."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    return precision  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where the file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively: x86 with AVX512-BF16 or AMX (``/proc/cpuinfo`` flags, or
    torch's CPU capability string where it names them)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS) or "BF16" in capability or "AMX" in capability


def has_fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively (CUDA capability >= 8.0, or :func:`cpu_has_fast_bf16`)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision ('fp32', 'bf16' or 'fp16') of ``precision`` on ``device``: 'auto' → bf16 where
    :func:`has_fast_bf16`, else fp32."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` of ``device``'s type in the dtype of a concrete ``precision``; nothing for fp32."""
    if check_precision(precision) == "auto":
        raise ValueError("precision: resolve 'auto' with resolve_precision before autocast, got 'auto'")
    if precision == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=DTYPES[precision]):
        yield


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` for ``device``: enabled for fp16 only (bf16 and fp32 need no loss scaling)."""
    check_precision(precision)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
