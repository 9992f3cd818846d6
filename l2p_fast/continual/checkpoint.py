"""Checkpoints of a run: written atomically, verified by a SHA-256 digest, every field checked before use.

File layout: the line ``L2P-FAST-CHECKPOINT 2``, the SHA-256 (64 hex digits) of the payload and a
newline, then the payload, a ``torch.save`` archive of a dict of tensors, numbers, strings, lists and
dicts only (read with ``weights_only=True``). ``torch.load`` does not check the archive's CRCs, so
the digest is what makes a single flipped bit anywhere in the file an error. The payload records
the format, the config fingerprint and the backbone fingerprint.

:func:`load_checkpoint` raises :class:`CheckpointError` for a file that cannot be read, fails the
digest, is not a checkpoint of this format, belongs to another configuration or backbone, or holds
a non-finite model, optimiser or method tensor. :func:`check_run_state` checks the rest against the
run's plan (position, accuracy rows, counters, elapsed times, RNG state). Nothing is silently
ignored. Checkpoints written by the digest-less format 1 cannot be resumed.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .output import torch_bytes, write_bytes_atomic

FORMAT = "l2p_fast.continual.checkpoint/2"
MAGIC = b"L2P-FAST-CHECKPOINT 2\n"
DIGEST_HEX = 64
CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("format", "config_fingerprint", "backbone_fingerprint", "position", "model", "optimizer", "method")
POSITION_KEYS = ("phase", "epoch", "step", "global_step")
ELAPSED_KEYS = ("train", "eval", "setup", "examples")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt, inconsistent, belongs to another run, or cannot be written."""


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file holding ``state`` (plus the format tag): header, digest, payload."""
    payload = torch_bytes({"format": FORMAT, **state})
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; a failed write keeps the previous checkpoint and raises
    :class:`CheckpointError`."""
    path = Path(path)
    try:
        return write_bytes_atomic(path, encode_checkpoint(state))
    except OSError as error:
        raise CheckpointError(
            f"checkpoint {path}: cannot be written ({error.strerror or error}); the previous checkpoint, if any, "
            "is kept"
        ) from error


def _unreadable(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path}: cannot be read: {reason}; it is corrupt or not an l2p-fast checkpoint of format 2. "
        "Delete it to start over, or give another --output."
    )


def decode_checkpoint(data: bytes, path: str | Path) -> dict[str, Any]:
    """Verify the header and digest of a checkpoint file's bytes and load its payload (``path`` names it)."""
    path = Path(path)
    if not data:
        raise _unreadable(path, "the file is empty (0 bytes)")
    if not data.startswith(MAGIC):
        raise _unreadable(path, "no checkpoint header")
    start = len(MAGIC) + DIGEST_HEX + 1
    stored = data[len(MAGIC) : start]
    payload = data[start:]
    if len(data) < start or stored[-1:] != b"\n":
        raise _unreadable(path, "the header is cut short or damaged")
    if hashlib.sha256(payload).hexdigest().encode() != stored[:-1]:
        raise _unreadable(path, "its SHA-256 digest does not match its content (a changed or truncated file)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every load failure becomes one clear error
        lines = str(error).splitlines()
        raise _unreadable(path, f"{type(error).__name__}: {lines[0][:200] if lines else ''}") from error
    return state


def load_checkpoint(path: str | Path, config_fingerprint: str, backbone_fingerprint: str) -> dict[str, Any]:
    """Read, verify and check a checkpoint; raises :class:`CheckpointError` naming the file and the problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _unreadable(path, error.strerror or str(error)) from error
    state = decode_checkpoint(data, path)
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
    for part in ("model", "optimizer", "method"):
        bad = first_non_finite(state[part], part)
        if bad is not None:
            raise CheckpointError(f"checkpoint {path}: {bad} holds NaN or inf; the saved state is unusable")
    return state


def first_non_finite(value: Any, where: str) -> str | None:
    """The name of the first floating tensor or float inside ``value`` (nested dicts/lists) that is not finite."""
    if isinstance(value, Tensor):
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            return where
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_non_finite(item, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_state(
    state: dict[str, Any],
    path: str | Path,
    *,
    batches_per_epoch: Sequence[int],
    epochs: int,
    evaluated_tasks: Sequence[int],
    num_tasks: int,
    pool_size: int,
) -> dict[str, int]:
    """Check a loaded checkpoint against the run's plan; returns its position.

    ``batches_per_epoch[p]`` / ``evaluated_tasks[p]``: training batches per epoch and tasks evaluated
    of phase ``p``. The position must lie inside the plan with ``global_step`` equal to the steps it
    implies; there must be one accuracy row (finite, in [0, 100], one entry per evaluated task) per
    finished phase; the prompt counters must be non-negative int64 (num_tasks, pool_size); the
    elapsed times finite and non-negative; the RNG state a CPU generator state; and a position
    inside a phase needs the optimiser state.
    """

    def fail(message: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {message}; the file was edited or damaged")

    phases = len(batches_per_epoch)
    position = state.get("position")
    if not isinstance(position, dict) or set(position) != set(POSITION_KEYS) or not all(
        _int(position[k]) for k in POSITION_KEYS
    ):
        raise fail(f"position must be integers {list(POSITION_KEYS)}, got {position!r}")
    phase, epoch, step = position["phase"], position["epoch"], position["step"]
    finished = phase == phases and epoch == 0 and step == 0
    inside = 0 <= phase < phases and 0 <= epoch < epochs and 0 <= step <= batches_per_epoch[min(phase, phases - 1)]
    if not (finished or inside):
        raise fail(
            f"position phase {phase}, epoch {epoch}, step {step} lies outside this run's plan ({phases} phases of "
            f"{epochs} epochs of {list(batches_per_epoch)} steps)"
        )
    steps = sum(batches_per_epoch[:phase]) * epochs + (epoch * batches_per_epoch[phase] + step if inside else 0)
    if position["global_step"] != steps:
        raise fail(f"global_step is {position['global_step']}, its position implies {steps}")

    rows = state.get("rows")
    if not isinstance(rows, list) or len(rows) != phase:
        raise fail(f"expected {phase} accuracy rows (one per finished phase), got {rows!r}"[:300])
    for p, row in enumerate(rows):
        ok = isinstance(row, list) and len(row) == len(evaluated_tasks[p]) and all(
            isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a) and 0 <= a <= 100
            for a in row
        )
        if not ok:
            raise fail(f"accuracy row {p} must be {len(evaluated_tasks[p])} percentages in [0, 100], got {row!r}")

    for name in ("counts_train", "counts_test"):
        counts = state.get(name)
        if (not isinstance(counts, Tensor) or counts.dtype != torch.long
                or tuple(counts.shape) != (num_tasks, pool_size) or bool((counts < 0).any())):
            shape = tuple(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__
            raise fail(f"{name} must be non-negative int64 of shape {(num_tasks, pool_size)}, got {shape}")

    elapsed = state.get("elapsed")
    if not isinstance(elapsed, dict) or set(elapsed) != set(ELAPSED_KEYS):
        raise fail(f"elapsed must hold {list(ELAPSED_KEYS)}, got {elapsed!r}")
    for key in ELAPSED_KEYS:
        value = elapsed[key]
        kind_ok = _int(value) if key == "examples" else isinstance(value, int | float) and not isinstance(value, bool)
        if not kind_ok or not math.isfinite(value) or value < 0:
            raise fail(f"elapsed[{key!r}] must be a finite non-negative number, got {value!r}")

    rng = state.get("rng")
    expected_rng = torch.get_rng_state()
    if not isinstance(rng, Tensor) or rng.dtype != torch.uint8 or rng.shape != expected_rng.shape:
        raise fail("rng must be the uint8 state of torch's CPU generator")

    optimizer = state.get("optimizer")
    if inside and (epoch or step) and not (isinstance(optimizer, dict) and "state" in optimizer
                                          and "param_groups" in optimizer):
        raise fail("a position inside a phase needs the optimiser state, which is missing")
    return position


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's optimiser state, checking hyper-parameters and per-parameter tensor shapes."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    try:
        optimizer.load_state_dict(state)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path}: its optimiser state does not fit this run ({error})") from error
    loaded = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    if loaded != fresh:
        raise CheckpointError(f"checkpoint {path}: optimiser settings {loaded} differ from this run's {fresh}")
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, Tensor) and value.dim() and value.shape != param.shape:
                    raise CheckpointError(
                        f"checkpoint {path}: optimiser tensor {name!r} has shape {tuple(value.shape)}, its parameter "
                        f"{tuple(param.shape)}"
                    )


def restore_scaler(scaler: torch.amp.GradScaler, state: Any, path: Path, started: bool) -> None:
    """Load a checkpoint's loss-scaler state (``{}`` when loss scaling is off) into ``scaler``.

    An enabled scaler (fp16) of a run that has taken steps (``started``) needs a finite positive
    ``scale`` and a non-negative integer growth tracker; a disabled one needs ``{}``.
    """
    if not scaler.is_enabled():
        if state not in (None, {}):
            raise CheckpointError(f"checkpoint {path}: holds a loss-scaler state, but this run does not scale the loss")
        return
    if not started and state in (None, {}):
        return
    scale = state.get("scale") if isinstance(state, dict) else None
    tracker = state.get("_growth_tracker") if isinstance(state, dict) else None
    if not (isinstance(scale, int | float) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
            and _int(tracker) and tracker >= 0):
        raise CheckpointError(
            f"checkpoint {path}: the fp16 loss-scaler state must hold a finite positive scale and a growth tracker, "
            f"got {state!r}"[:300]
        )
    try:
        scaler.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path}: its loss-scaler state does not fit this run ({error})") from error
