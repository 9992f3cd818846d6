"""Output folders of runs: checked, locked to one run at a time, written atomically.

A run holds an exclusive ``fcntl.flock`` on ``<output>/.l2p-fast.lock`` for its whole lifetime (the
file records the holder's pid, host and start time, shown to a second run that finds it taken; the
kernel releases the lock when the process ends, even on SIGKILL). Every file is written to a
uniquely named temporary file in the same folder (``.l2p-fast-tmp-<name>.<random>``), flushed to disk, then
renamed over the target, so a reader never sees a half-written file and two writers never share a
temporary file. Temporary files left in the folder by a killed run are removed when the next run
takes the lock.

On several processes (:mod:`.distributed`) the processes of one run are one run: rank 0 takes the
lock and every process gets its verdict (all fail alike when the folder is taken), and only rank 0
writes files (:func:`write_bytes_atomic` and what builds on it are no-ops on the others).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import socket
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from . import distributed

LOCK_NAME = ".l2p-fast.lock"
TEMP_PREFIX = ".l2p-fast-tmp-"
# files that mark a folder as holding an earlier run (a single run's results / checkpoint, or a comparison)
EARLIER_RUN_FILES = ("results.json", "checkpoint.pt", "comparison.json")


class OutputError(ValueError):
    """The output folder cannot be used: another run holds it, or it holds an earlier run."""


def ensure_writable_dir(path: str | Path, argument: str = "output") -> Path:
    """Create ``path`` if needed and check a file can be written in it; ``ValueError`` names ``argument``.

    An empty path is refused (it would mean the current directory).
    """
    if not str(path).strip():
        raise ValueError(f"{argument}: expected a folder path, got {str(path)!r} (empty: it would be the current "
                         "directory; name a folder, e.g. runs/my_run)")
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{argument}: expected a folder, got the file {str(path)!r}")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{argument}: cannot write to {str(path)!r} ({error.strerror or error})") from error
    return path


def earlier_run_files(folder: str | Path) -> list[str]:
    """The names of :data:`EARLIER_RUN_FILES` present in ``folder``."""
    return [name for name in EARLIER_RUN_FILES if (Path(folder) / name).exists()]


def refuse_earlier_run(folder: str | Path, resume: bool) -> None:
    """Raise :class:`OutputError` when ``folder`` holds an earlier run and ``resume`` is off."""
    found = earlier_run_files(folder)
    if found and not resume:
        raise OutputError(
            f"output: {folder} already holds an earlier run ({', '.join(found)}); pass --resume to continue "
            "it, or choose another --output"
        )


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` inside the block; :class:`OutputError` names the holder if taken.

    On several processes every process calls it: rank 0 holds the lock, the others share its verdict."""
    with contextlib.ExitStack() as stack:
        distributed.from_main(lambda: stack.enter_context(_flock(folder)), "locking the output folder")
        yield


@contextlib.contextmanager
def _flock(folder: str | Path) -> Iterator[None]:
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            raise OutputError(
                f"output: {folder} is in use by another run ({holder}); wait for it to end or choose another "
                "--output"
            ) from None
        started = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
        for leftover in Path(folder).glob(f"{TEMP_PREFIX}*"):  # only the lock holder writes here
            with contextlib.suppress(OSError):
                leftover.unlink()
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _write_all(file: io.BufferedWriter, data: bytes) -> None:
    file.write(data)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a unique temporary file, fsync and rename; ``OSError`` leaves no trace.

    On several processes only rank 0 writes (the others return ``path`` at once)."""
    path = Path(path)
    if not distributed.is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            _write_all(file, data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
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
    return write_bytes_atomic(path, (json.dumps(_clean(value), indent=2) + "\n").encode())


def torch_bytes(value: Any) -> bytes:
    """``torch.save(value)`` into memory."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def atomic_torch_save(value: Any, path: str | Path) -> Path:
    """``torch.save`` atomically (no half-written file survives an interruption)."""
    return write_bytes_atomic(path, torch_bytes(value))
