"""Several seeds of one comparison: parse ``--seeds``, and each metric's mean ± standard deviation per method.

A run's seed sets the model's initialisation, the batch order and the replay draws; the class order is
the benchmark's (``class_order_seed``, unchanged across seeds), so the seeds measure the spread of
training, not of the task sequence. The standard deviation is the sample one (n − 1); None for one seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .metrics import learning_accuracy

# figures summarised over seeds: (key, where) with where "" for the results dict, "selection" for its diagnostics
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("average_accuracy", ""),
    ("forgetting", ""),
    ("learning_accuracy", ""),
    ("train_examples_per_second", ""),
    ("seconds", ""),
    ("selection_accuracy", "selection"),
    ("usage_entropy", "selection"),
    ("usage_overlap_mean", "selection"),
    ("component_mass_share", "selection"),
)


def parse_seeds(seeds: str | Sequence[int]) -> list[int]:
    """``"0,1,2"`` or a list → distinct non-negative integer seeds (``ValueError`` names the bad one)."""
    items = [s.strip() for s in seeds.split(",")] if isinstance(seeds, str) else list(seeds)
    items = [s for s in items if s != ""]
    if not items:
        raise ValueError(f"seeds: expected a comma-separated list of integers >= 0, got {seeds!r}")
    out = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            value = -1
        if isinstance(item, bool) or value < 0 or str(value) != str(item).strip():
            raise ValueError(f"seeds: expected integers >= 0, got {item!r} in {seeds!r}")
        out.append(value)
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: {out} names a seed twice")
    return out


def metric(result: dict[str, Any], key: str, where: str = "") -> float | None:
    """One figure of a run's results (None when the run has none); learning accuracy is derived from the
    accuracy matrix when an older results file lacks it."""
    source = result.get("selection_diagnostics", {}) if where == "selection" else result
    value = source.get(key)
    if value is None and key == "learning_accuracy" and where == "" and result.get("forgetting") is not None:
        value = learning_accuracy(result["accuracy_matrix"])
    return None if value is None else float(value)


def mean_std(values: Sequence[float | None]) -> dict[str, Any] | None:
    """``{"mean", "std", "n", "values"}`` of the known values (None when there are none); std: sample, n ≥ 2."""
    known = [float(v) for v in values if v is not None]
    if not known:
        return None
    mean = sum(known) / len(known)
    std = math.sqrt(sum((v - mean) ** 2 for v in known) / (len(known) - 1)) if len(known) > 1 else None
    return {"mean": mean, "std": std, "n": len(known), "values": known}


def summarize_seeds(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (first-appearance order): its seeds and :func:`mean_std` of every ``SUMMARY_METRICS`` figure."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["method"], []).append(result)
    summary = []
    for method, runs in groups.items():
        entry: dict[str, Any] = {"method": method, "seeds": [r.get("config", {}).get("seed") for r in runs]}
        for key, where in SUMMARY_METRICS:
            entry[key] = mean_std([metric(r, key, where) for r in runs])
        summary.append(entry)
    return summary
