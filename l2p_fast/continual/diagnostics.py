"""Selection diagnostics of prompt methods: does a test input pick the prompts its task trained?

All inputs are counts the trainer records: ``counts[t][m]`` (T tasks, M pool entries) is how often
pool entry ``m`` was selected by the test examples of task ``t`` (one count per selected slot, K per
example). Figures:

* **selection accuracy** (with a task mask, ``use_prompt_mask``: task ``t`` trains entries
  ``t·K … t·K+K−1``): the share (%) of task ``t``'s test selections that fall in those entries. None for
  a task whose range exceeds M (it trained unmasked) or that made no selections.
* **usage entropy**: the entropy of task ``t``'s selection distribution divided by ``log M`` (0: one
  entry only; 1: all entries equally).
* **usage overlap**: for tasks ``s, t`` the histogram intersection ``Σ_m min(p_s[m], p_t[m])`` of their
  selection distributions (1: identical usage; 0: disjoint), and its mean over pairs ``s < t``.
* **key–query similarity**: the pull term ``reduce_sim`` (Σ cos(query, selected keys) / B) averaged per
  epoch; divided by K it is the mean cosine between a query and a selected key.
* **component mass** (CODA-Prompt, ``component_mass_test`` (T, M)): the share (%) of task ``t``'s test
  weight mass on task ``t``'s own components, ⌊M/T⌋ per task in order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "component_mass_share",
    "key_query_similarity",
    "selection_accuracy",
    "selection_diagnostics",
    "task_slots",
    "usage_entropy",
    "usage_overlap",
]


def _counts(counts: Any, name: str = "counts") -> np.ndarray:
    if hasattr(counts, "detach"):
        counts = counts.detach().cpu().numpy()
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name}: expected a non-empty T x M matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name}: expected finite, non-negative values")
    return array


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def task_slots(task: int, top_k: int, pool_size: int) -> range | None:
    """Entries ``t·K … t·K+K−1`` that the task mask trains for ``task``; None when the range exceeds M."""
    if top_k < 1 or task < 0:
        raise ValueError(f"task_slots: expected task >= 0 and top_k >= 1, got task={task}, top_k={top_k}")
    start, end = task * top_k, (task + 1) * top_k
    return range(start, end) if end <= pool_size else None


def selection_accuracy(counts: Any, top_k: int) -> list[float | None]:
    """Per task, the share (%) of its test selections (T, M) that hit its own masked entries (see module doc)."""
    array = _counts(counts)
    out: list[float | None] = []
    for t, row in enumerate(array):
        slots = task_slots(t, top_k, array.shape[1])
        total = row.sum()
        out.append(None if slots is None or total == 0 else float(100.0 * row[slots.start:slots.stop].sum() / total))
    return out


def _distributions(array: np.ndarray) -> np.ndarray:
    totals = array.sum(axis=1, keepdims=True)
    return np.divide(array, totals, out=np.zeros_like(array), where=totals > 0)


def usage_entropy(counts: Any) -> list[float | None]:
    """Per task, the entropy of its selection distribution over the M entries / log M (None: no selections)."""
    array = _counts(counts)
    probs = _distributions(array)
    width = array.shape[1]
    out: list[float | None] = []
    for row, p in zip(array, probs, strict=True):
        if row.sum() == 0:
            out.append(None)
            continue
        nonzero = p[p > 0]
        entropy = float(-(nonzero * np.log(nonzero)).sum())
        out.append(entropy / math.log(width) if width > 1 else 0.0)
    return out


def usage_overlap(counts: Any) -> list[list[float | None]]:
    """T x T histogram intersection of the tasks' selection distributions (None where a task made none)."""
    array = _counts(counts)
    probs = _distributions(array)
    used = array.sum(axis=1) > 0
    num = array.shape[0]
    return [[float(np.minimum(probs[s], probs[t]).sum()) if used[s] and used[t] else None for t in range(num)]
            for s in range(num)]


def component_mass_share(mass: Any) -> list[float | None]:
    """CODA-Prompt: per task, the share (%) of its test weight mass (T, M) on its own F = ⌊M/T⌋ components
    (task t owns rows t·F … t·F+F−1; rows from T·F on belong to no task)."""
    array = _counts(mass, "component_mass")
    num, width = array.shape
    if width < num:
        raise ValueError(f"component_mass: expected at least one component per task ({num}), got M = {width}")
    per_task = width // num
    out: list[float | None] = []
    for t, row in enumerate(array):
        total = row.sum()
        out.append(None if total == 0 else float(100.0 * row[t * per_task:(t + 1) * per_task].sum() / total))
    return out


def key_query_similarity(reduce_sim_per_epoch: Any, top_k: int) -> list[list[float]]:
    """Per task and epoch, the mean cosine between a query and its selected keys: ``reduce_sim / K``."""
    if top_k < 1:
        raise ValueError(f"top_k: expected an integer >= 1, got {top_k!r}")
    return [[float(v) / top_k for v in epochs] for epochs in reduce_sim_per_epoch]


def selection_diagnostics(results: dict[str, Any]) -> dict[str, Any]:
    """The figures above for one run's results dict; ``{}`` for a method without prompts.

    Reads ``prompt_counts_test`` (T, M), ``config`` (``top_k``, ``use_prompt_mask``), and when present
    ``reduce_sim_per_epoch`` and ``component_mass_test``.
    """
    counts = results.get("prompt_counts_test")
    mass = results.get("component_mass_test")
    if counts is None and mass is None:
        return {}
    config = results.get("config", {})
    top_k = int(config.get("top_k", 1))
    out: dict[str, Any] = {}
    if counts is not None and _counts(counts, "prompt_counts_test").sum() > 0:
        overlap = usage_overlap(counts)
        pairs = [overlap[s][t] for s in range(len(overlap)) for t in range(s + 1, len(overlap))]
        entropy = usage_entropy(counts)
        out.update(usage_entropy_per_task=entropy, usage_entropy=_mean(entropy), usage_overlap=overlap,
                   usage_overlap_mean=_mean(pairs))
        if config.get("use_prompt_mask"):
            accuracy = selection_accuracy(counts, top_k)
            out.update(selection_accuracy_per_task=accuracy, selection_accuracy=_mean(accuracy))
    if results.get("reduce_sim_per_epoch"):
        out["key_query_similarity_per_epoch"] = key_query_similarity(results["reduce_sim_per_epoch"], top_k)
    if mass is not None:
        share = component_mass_share(mass)
        out.update(component_mass_share_per_task=share, component_mass_share=_mean(share))
    return out
