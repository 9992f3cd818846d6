"""Writing results: checked output folders, atomic JSON and tensor files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def ensure_writable_dir(path: str | Path, argument: str = "output") -> Path:
    """Create ``path`` if needed and check a file can be written in it; ``ValueError`` names ``argument``."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{argument}: expected a folder, got the file {str(path)!r}")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{argument}: cannot write to {str(path)!r} ({error.strerror or error})") from error
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as indented JSON (NaN/inf become null), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(value), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def atomic_torch_save(value: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, then rename (no half-written file survives an interruption)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return path
