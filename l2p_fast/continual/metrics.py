"""Metrics of a continual-learning run (docs/behaviour.md §7).

``acc[t][i]`` is the accuracy (%) on task ``i``'s test set after training on task ``t``. Only the
lower triangle (``i <= t``) is meaningful; entries above the diagonal are ignored (and stored as
NaN by :func:`as_accuracy_matrix`). A ragged lower triangle (row ``t`` of length ``t + 1``) is
accepted as well as a square matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_accuracy_matrix",
    "average_accuracy",
    "average_accuracy_curve",
    "backward_transfer",
    "empty_accuracy_matrix",
    "forgetting",
    "learning_accuracy",
    "learning_accuracy_per_task",
    "summarize",
]


def empty_accuracy_matrix(num_tasks: int) -> np.ndarray:
    """A ``num_tasks x num_tasks`` float matrix of NaN, to be filled row by row."""
    if int(num_tasks) != num_tasks or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    return np.full((int(num_tasks), int(num_tasks)), np.nan)


def as_accuracy_matrix(acc_matrix: Any) -> np.ndarray:
    """Validate ``acc_matrix`` and return it as a square float64 array, NaN above the diagonal.

    Accepts a square 2-D array-like (numpy, torch, nested lists) or a ragged list whose row ``t``
    has at least ``t + 1`` entries. Raises ``ValueError`` on an empty or badly shaped input, or on
    a non-finite value in the lower triangle.
    """
    if hasattr(acc_matrix, "detach"):  # torch tensor
        acc_matrix = acc_matrix.detach().cpu().numpy()
    if isinstance(acc_matrix, np.ndarray):
        if acc_matrix.ndim != 2 or acc_matrix.shape[0] != acc_matrix.shape[1]:
            raise ValueError(f"acc_matrix must be square (T x T), got shape {acc_matrix.shape}")
        rows: Sequence[Any] = list(acc_matrix)
    elif isinstance(acc_matrix, Sequence) and not isinstance(acc_matrix, (str, bytes)):
        rows = acc_matrix
    else:
        raise ValueError(f"acc_matrix must be a 2-D array or a list of rows, got {type(acc_matrix).__name__}")
    num_tasks = len(rows)
    if num_tasks == 0:
        raise ValueError("acc_matrix is empty: need at least one task")
    out = np.full((num_tasks, num_tasks), np.nan)
    for t, row in enumerate(rows):
        row_arr = np.asarray(row, dtype=np.float64)
        if row_arr.ndim != 1:
            raise ValueError(f"acc_matrix row {t} must be 1-D, got shape {row_arr.shape}")
        if not t + 1 <= len(row_arr) <= num_tasks:
            raise ValueError(
                f"acc_matrix row {t} has {len(row_arr)} entries; with {num_tasks} rows it needs "
                f"between {t + 1} and {num_tasks} (accuracies on tasks 0..{t})"
            )
        lower = row_arr[: t + 1]
        if not np.all(np.isfinite(lower)):
            raise ValueError(f"acc_matrix row {t} has a non-finite accuracy in its first {t + 1} entries")
        out[t, : t + 1] = lower
    return out


def average_accuracy(acc_matrix: Any, after_task: int | None = None) -> float:
    """Mean over ``i <= T`` of ``acc[T][i]``; ``T`` is the last task unless ``after_task`` is given."""
    acc = as_accuracy_matrix(acc_matrix)
    last = acc.shape[0] - 1 if after_task is None else _check_task(after_task, acc.shape[0])
    return float(np.mean(acc[last, : last + 1]))


def average_accuracy_curve(acc_matrix: Any) -> list[float]:
    """Average accuracy after each task: ``[average_accuracy(acc, t) for t in range(T)]``."""
    acc = as_accuracy_matrix(acc_matrix)
    return [float(np.mean(acc[t, : t + 1])) for t in range(acc.shape[0])]


def forgetting(acc_matrix: Any) -> float:
    """Mean over ``i < T`` of ``max_{i <= t < T} acc[t][i] - acc[T][i]``; 0.0 for a single task."""
    acc = as_accuracy_matrix(acc_matrix)
    last = acc.shape[0] - 1
    if last == 0:
        return 0.0
    drops = [np.max(acc[i:last, i]) - acc[last, i] for i in range(last)]
    return float(np.mean(drops))


def backward_transfer(acc_matrix: Any) -> float:
    """Mean over ``i < T`` of ``acc[T][i] - acc[i][i]`` (negative means forgetting); 0.0 for one task."""
    acc = as_accuracy_matrix(acc_matrix)
    last = acc.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([acc[last, i] - acc[i, i] for i in range(last)]))


def learning_accuracy_per_task(acc_matrix: Any) -> list[float]:
    """``acc[t][t]`` for every task: the accuracy on each task right after learning it (the diagonal)."""
    acc = as_accuracy_matrix(acc_matrix)
    return [float(acc[t, t]) for t in range(acc.shape[0])]


def learning_accuracy(acc_matrix: Any) -> float:
    """Mean over tasks of ``acc[t][t]``: how well each task was learned at all, so that low forgetting from
    never learning shows (forgetting measures drops from the best earlier value, never from a task not learned)."""
    return float(np.mean(learning_accuracy_per_task(acc_matrix)))


def summarize(acc_matrix: Any) -> dict[str, Any]:
    """All metrics of one run as a JSON-serialisable dict."""
    acc = as_accuracy_matrix(acc_matrix)
    return {
        "num_tasks": int(acc.shape[0]),
        "average_accuracy": average_accuracy(acc),
        "forgetting": forgetting(acc),
        "backward_transfer": backward_transfer(acc),
        "learning_accuracy": learning_accuracy(acc),
        "learning_accuracy_per_task": learning_accuracy_per_task(acc),
        "average_accuracy_curve": average_accuracy_curve(acc),
        "acc_matrix": [[float(v) for v in acc[t, : t + 1]] for t in range(acc.shape[0])],
    }


def _check_task(task: int, num_tasks: int) -> int:
    if int(task) != task or not 0 <= task < num_tasks:
        raise ValueError(f"after_task must be an integer in [0, {num_tasks - 1}], got {task!r}")
    return int(task)
