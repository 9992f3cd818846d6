"""The one dispatcher: which implementation of which op runs, from static facts only.

- ``IMPLEMENTATIONS``: the one table (op, backend) → implementation, filled by the op modules of
  ``l2p_fast.ops`` through ``register`` when ``l2p_fast`` is imported.
- ``AUTO_PREFERENCE``: one list per device type of the backends ``auto`` tries, best first.
- ``unavailable_reason``: one availability check per backend (what was built or installed, the
  device type, ``TRITON_INTERPRET``).
- One error for an explicit request that cannot be met (``RuntimeError`` saying why); ``auto``
  falls back quietly, logging why at debug level.

The choice depends on the op, the requested name, the device type and the ``L2P_FAST_BACKEND``
environment variable (read once, when ``auto`` is first resolved; ``clear_cache`` forgets), never on
tensor values. ``resolve`` is a constant to ``torch.compile`` (``assume_constant_result``: Dynamo runs
it once while tracing and bakes its answer in), so a compiled module traces no lookup, installs no
guard on it, and its very first call may be the compiled one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable

import torch

from . import _native

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("reference", "cpu", "cuda", "triton")

# device type -> backends `auto` tries, best first (the reference runs everywhere)
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

ENV_VAR = "L2P_FAST_BACKEND"
TRITON_FOUND = importlib.util.find_spec("triton") is not None

# (op, backend) -> implementation; see l2p_fast/ops/ for each op's entries
IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}


def register(op: str, *backends: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on each of ``backends``."""

    def add(fn: Callable) -> Callable:
        for backend in backends:
            IMPLEMENTATIONS[(op, backend)] = fn
        return fn

    return add


def known_ops() -> tuple[str, ...]:
    """The ops that have at least one implementation in the table."""
    return tuple(sorted({op for op, _ in IMPLEMENTATIONS}))


def triton_interpreting() -> bool:
    """Whether Triton runs through its interpreter (``TRITON_INTERPRET=1``: CPU tensors accepted)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _native_reason(name: str, device_type: str) -> str | None:
    if device_type != name:
        return f"backend {name!r} runs on {name!r} tensors, got {device_type!r} tensors"
    if not _native.is_built():
        return _native.LOAD_ERROR or "l2p_fast._C is not built"
    if name == "cuda" and not _native.built_with_cuda():
        return "l2p_fast._C was built without CUDA (torch without CUDA or nvcc not found at build time)"
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _triton_reason(device_type: str) -> str | None:
    if not TRITON_FOUND:
        return "the triton package is not installed (pip install triton)"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        if triton_interpreting():
            return None
        return "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before importing"
    return f"Triton runs on 'cuda' tensors (or 'cpu' under TRITON_INTERPRET=1), got {device_type!r} tensors"


def unavailable_reason(name: str, device_type: str, op: str | None = None) -> str | None:
    """Why backend ``name`` cannot run (``op``, when given) on ``device_type`` tensors; None when it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; known: {BACKENDS}"
    if name == "reference":
        reason = None
    elif name == "triton":
        reason = _triton_reason(device_type)
    else:
        reason = _native_reason(name, device_type)
    if reason is None and op is not None and (op, name) not in IMPLEMENTATIONS:
        reason = f"op {op!r} has no {name!r} implementation; ops known: {known_ops()}"
    return reason


def implementation(op: str, requested: str, device_type: str) -> Callable:
    """The function that runs ``op`` for backend ``requested`` ('auto' or a name) on ``device_type``.

    Resolved once per (op, request, device type) and cached; under ``torch.compile`` the name comes
    from ``resolve``, which Dynamo runs once while tracing (no lookup is traced, no guard installed).
    """
    if torch.compiler.is_compiling():
        return IMPLEMENTATIONS[(op, resolve(op, requested, device_type))]
    fn = _IMPLEMENTATION_CACHE.get((op, requested, device_type))
    if fn is None:
        fn = IMPLEMENTATIONS[(op, resolve(op, requested, device_type))]
        _IMPLEMENTATION_CACHE[(op, requested, device_type)] = fn
    return fn


_IMPLEMENTATION_CACHE: dict[tuple[str, str, str], Callable] = {}
_NAME_CACHE: dict[tuple[str, str, str], str] = {}


def clear_cache() -> None:
    """Forget resolved backends: after building or installing one, or changing ``L2P_FAST_BACKEND``,
    in a running process."""
    _IMPLEMENTATION_CACHE.clear()
    _NAME_CACHE.clear()


@torch.compiler.assume_constant_result
def resolve(op: str, requested: str, device_type: str) -> str:
    """Name of the backend that runs ``op`` for ``requested`` ('auto' or a name) on ``device_type``.

    ``auto`` honours ``L2P_FAST_BACKEND`` (read when first resolved), else walks the device's
    preference list. Raises ``RuntimeError`` with the reason when an explicit request cannot be met.
    Cached per (op, request, device type); a constant to ``torch.compile``.
    """
    name = _NAME_CACHE.get((op, requested, device_type))
    if name is None:
        name = _NAME_CACHE[(op, requested, device_type)] = _resolve(op, requested, device_type)
    return name


def _resolve(op: str, requested: str, device_type: str) -> str:
    if requested == "auto":
        requested = os.environ.get(ENV_VAR) or "auto"
    if requested != "auto":
        reason = unavailable_reason(requested, device_type, op)
        if reason is not None:
            raise RuntimeError(f"backend={requested!r} is not available on {device_type!r}: {reason}")
        return requested
    for name in AUTO_PREFERENCE.get(device_type, ("reference",)):
        reason = unavailable_reason(name, device_type, op)
        if reason is None:
            return name
        logger.debug("backend 'auto' on %s skips %r: %s (op %s)", device_type, name, reason, op)
    return "reference"


def available_backends(device_type: str) -> list[str]:
    """Names of the backends that can run on ``device_type`` here."""
    return [name for name in BACKENDS if unavailable_reason(name, device_type) is None]
