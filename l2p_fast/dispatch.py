"""The one table that says which backend runs the prompt pool.

The choice depends only on static facts — the requested name, the device type, what was built,
and the ``L2P_FAST_BACKEND`` environment variable — never on tensor values, so ``torch.compile``
sees one graph. ``auto`` walks the device's preference list and falls back quietly (logging why at
debug level); an explicit request that cannot be met raises ``RuntimeError`` saying why.

Every backend module exposes ``unavailable_reason(device_type) -> str | None`` plus
``pool_forward(...)`` and ``prepend(...)`` with the signatures of ``l2p_fast.reference``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

# backend name -> module implementing it
BACKEND_MODULES: dict[str, str] = {
    "reference": "l2p_fast.backends.reference",
    "cpu": "l2p_fast.backends.native",
    "cuda": "l2p_fast.backends.native",
    "triton": "l2p_fast.backends.triton",
}

# device type -> backends `auto` tries, best first
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

ENV_VAR = "L2P_FAST_BACKEND"


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    # torch.compile cannot trace importlib (and ignores functools.cache): a backend already imported
    # by an eager call is taken from sys.modules, which Dynamo can read.
    loaded = sys.modules.get(BACKEND_MODULES[name])
    if loaded is not None:
        return loaded, None
    try:
        return importlib.import_module(BACKEND_MODULES[name]), None
    except ImportError as error:  # a backend whose module cannot import is simply not available
        return None, f"importing {BACKEND_MODULES[name]} failed: {error}"


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run on ``device_type`` (None when it can)."""
    if name not in BACKEND_MODULES:
        return f"unknown backend {name!r}; known: {tuple(BACKEND_MODULES)}"
    module, reason = _load(name)
    if module is None:
        return reason
    return module.unavailable_reason(name, device_type)


def resolve(requested: str, device_type: str) -> tuple[str, ModuleType]:
    """Return (backend name, backend module) for a request ('auto' or a name) on ``device_type``.

    ``auto`` honours the ``L2P_FAST_BACKEND`` environment variable when it is set.
    """
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
    key = (requested, device_type)
    if key not in _RESOLVED:  # a plain dict, which torch.compile reads and guards like any global
        _RESOLVED[key] = _resolve(requested, device_type)
    return _RESOLVED[key]


_RESOLVED: dict[tuple[str, str], tuple[str, ModuleType]] = {}


def clear_cache() -> None:
    """Forget resolved backends (after building or installing one in a running process)."""
    _RESOLVED.clear()


def _resolve(requested: str, device_type: str) -> tuple[str, ModuleType]:
    if requested != "auto":
        reason = unavailable_reason(requested, device_type)
        if reason is not None:
            raise RuntimeError(f"backend={requested!r} is not available on {device_type!r}: {reason}")
        return requested, _load(requested)[0]
    for name in AUTO_PREFERENCE.get(device_type, ("reference",)):
        reason = unavailable_reason(name, device_type)
        if reason is None:
            return name, _load(name)[0]
        logger.debug("backend 'auto' on %s skips %r: %s", device_type, name, reason)
    raise RuntimeError(f"no backend available on {device_type!r}")  # unreachable: reference always runs


def available_backends(device_type: str) -> list[str]:
    """Names of the backends that can run on ``device_type`` here."""
    return [name for name in BACKEND_MODULES if unavailable_reason(name, device_type) is None]
