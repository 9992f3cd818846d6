"""Checkpoints of a run: written atomically, read with ``weights_only=True``, checked before use.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only. It records the format
version, the config fingerprint and the backbone fingerprint; :func:`load_checkpoint` raises
:class:`CheckpointError` for a file that cannot be read, is not a checkpoint of this format, or
belongs to another configuration or backbone — it is never silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "l2p_fast.continual.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("format", "config_fingerprint", "backbone_fingerprint", "position", "model", "optimizer", "method")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt, or belongs to another run."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format tag) to ``path`` atomically: a temporary file, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, config_fingerprint: str, backbone_fingerprint: str) -> dict[str, Any]:
    """Read and check a checkpoint; raises :class:`CheckpointError` naming the file and the problem."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every read failure becomes one clear error
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "it is corrupt or not a checkpoint. Delete it to start over, or give another --output."
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path}: expected format {FORMAT!r}, found {found!r}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing entries {missing}")
    if state["config_fingerprint"] != config_fingerprint:
        raise CheckpointError(
            f"checkpoint {path}: written by a run with another configuration "
            f"(saved config: {state.get('config')}). Resume with the same settings, or give another --output."
        )
    if state["backbone_fingerprint"] != backbone_fingerprint:
        raise CheckpointError(f"checkpoint {path}: written with other backbone weights than the ones loaded now")
    return state
