"""PNG figures of a continual-learning run (matplotlib, Agg; no pyplot, so no global state).

* :func:`plot_accuracy_matrix` — heat map of ``acc[t][i]``.
* :func:`plot_task_accuracy` — accuracy after each task: per-task curves and the average for one
  run, or the average-accuracy curve of each method for several.
* :func:`plot_prompt_usage` — how often each prompt is selected per task (the L2P paper's
  prompt-selection histogram), normalised per task.
* :func:`plot_accuracy_spread` — several seeds per method: the mean average-accuracy curve, a ± std band and
  each seed's curve.
* :func:`plot_selection` — the prompt methods' selection diagnostics over seeds: selection accuracy (or usage
  entropy) per task, and the key–query cosine over training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import as_accuracy_matrix, average_accuracy_curve, learning_accuracy

__all__ = [
    "plot_accuracy_matrix",
    "plot_accuracy_spread",
    "plot_prompt_usage",
    "plot_selection",
    "plot_task_accuracy",
    "prompt_usage_frequencies",
]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_accuracy_matrix(
    acc_matrix: Any,
    path: str | Path,
    title: str = "Accuracy (%) on task i after training task t",
    task_names: Sequence[str] | None = None,
) -> Path:
    """Heat map of the lower triangle of ``acc_matrix`` (values annotated); returns ``path``."""
    acc = as_accuracy_matrix(acc_matrix)
    num = acc.shape[0]
    names = list(task_names) if task_names is not None else [str(i) for i in range(num)]
    if len(names) != num:
        raise ValueError(f"task_names has {len(names)} names for {num} tasks")
    size = 2.5 + 0.55 * num
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", vmin=0.0, vmax=100.0)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    if num <= 20:
        for t in range(num):
            for i in range(t + 1):
                ax.text(
                    i,
                    t,
                    f"{acc[t, i]:.1f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if acc[t, i] < 60 else "black",
                )
    ax.set_xticks(range(num), names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right")
    ax.set_yticks(range(num), names)
    ax.set_xlabel("evaluated on task i")
    ax.set_ylabel("after training task t")
    ax.set_title(title)
    return _save(fig, path)


def plot_task_accuracy(
    results: Any,
    path: str | Path,
    title: str = "Accuracy after each task",
    reference: Mapping[str, float] | None = None,
) -> Path:
    """Accuracy after each task.

    ``results`` is one accuracy matrix (plots each task's accuracy over time and the average) or
    a mapping ``{method: accuracy matrix}`` (plots the average-accuracy curve of each method).
    ``reference`` ``{label: accuracy}`` adds dashed horizontal lines (e.g. the ``joint`` upper bound).
    """
    if isinstance(results, Mapping):  # one run per method: the several-seeds plot with one seed each
        if not results:
            raise ValueError("results is an empty mapping: need at least one method")
        return plot_accuracy_spread({method: [matrix] for method, matrix in results.items()}, path, title, reference)
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    acc = as_accuracy_matrix(results)
    num = acc.shape[0]
    for i in range(num):
        steps = np.arange(i + 1, num + 1)
        ax.plot(steps, acc[i:, i], marker=".", linewidth=1.0, alpha=0.8, label=f"task {i}")
    curve = average_accuracy_curve(acc)
    ax.plot(np.arange(1, num + 1), curve, color="black", linewidth=2.5, marker="o",
            label=f"average (final {curve[-1]:.1f})")
    ax.set_ylabel("accuracy (%)")
    _reference_lines(ax, reference)
    ax.set_xlabel("tasks learned")
    ax.set_ylim(0, 100)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    return _save(fig, path)


def prompt_usage_frequencies(counts_per_task: Any) -> np.ndarray:
    """Selection counts ``T x M`` normalised so that each task's row sums to 1 (all-zero rows stay 0)."""
    if hasattr(counts_per_task, "detach"):
        counts_per_task = counts_per_task.detach().cpu().numpy()
    counts = np.asarray(counts_per_task, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
        raise ValueError(f"counts_per_task must be a non-empty T x M matrix, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts_per_task must hold finite, non-negative counts")
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def plot_prompt_usage(
    counts_per_task: Any,
    path: str | Path,
    title: str = "Prompt selection frequency per task",
    kind: str = "bar",
) -> Path:
    """Per-task prompt-selection frequency: grouped bars (``kind="bar"``) or a heat map (``"heatmap"``)."""
    if kind not in ("bar", "heatmap"):
        raise ValueError(f"kind must be 'bar' or 'heatmap', got {kind!r}")
    freq = prompt_usage_frequencies(counts_per_task)
    num_tasks, num_prompts = freq.shape
    fig = _new_figure(max(6.0, 0.25 * num_prompts * max(1, num_tasks) ** 0.5 + 3), 4.5)
    ax = fig.add_subplot()
    if kind == "bar":
        width = 0.8 / num_tasks
        x = np.arange(num_prompts)
        for t in range(num_tasks):
            ax.bar(x - 0.4 + (t + 0.5) * width, freq[t], width=width, label=f"task {t}")
        ax.set_xticks(x)
        ax.set_xlabel("prompt id")
        ax.set_ylabel("selection frequency")
        ax.set_ylim(0, min(1.0, 1.15 * float(freq.max())) or 1.0)
        ax.legend(fontsize=8, ncol=max(1, num_tasks // 5))
    else:
        image = ax.imshow(freq, aspect="auto", cmap="magma", vmin=0.0, vmax=max(float(freq.max()), 1e-12))
        fig.colorbar(image, ax=ax, label="selection frequency")
        ax.set_xlabel("prompt id")
        ax.set_ylabel("task")
        ax.set_yticks(range(num_tasks))
        if num_prompts <= 30:
            ax.set_xticks(range(num_prompts))
    ax.set_title(title)
    return _save(fig, path)


def _reference_lines(ax: Any, reference: Mapping[str, float] | None) -> None:
    for label, value in (reference or {}).items():
        ax.axhline(float(value), linestyle="--", color="grey", linewidth=1.2)
        ax.annotate(f"{label} {float(value):.1f}", (1.0, float(value)), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize=8, color="grey")


def plot_accuracy_spread(
    runs: Mapping[str, Sequence[Any]],
    path: str | Path,
    title: str = "Average accuracy on the tasks seen so far (mean ± std over seeds)",
    reference: Mapping[str, float] | None = None,
) -> Path:
    """``runs`` ``{method: [accuracy matrix of each seed]}``: per method the mean average-accuracy curve, a
    band of ± one sample std (two seeds or more) and each seed's curve, thin; the legend gives the final
    average and the learning accuracy (mean of the diagonal); ``reference`` as in :func:`plot_task_accuracy`."""
    if not runs:
        raise ValueError("runs is an empty mapping: need at least one method")
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for method, matrices in runs.items():
        if not matrices:
            raise ValueError(f"runs[{method!r}] is empty: need at least one accuracy matrix")
        curves = np.array([average_accuracy_curve(m) for m in matrices])
        steps = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(axis=0)
        std = curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        learned = float(np.mean([learning_accuracy(m) for m in matrices]))  # beside the final average: learned
        label = f"{method} (final {mean[-1]:.1f}" + (f" ± {std[-1]:.1f}" if len(curves) > 1 else "") + \
            f", learned {learned:.1f})"
        (line,) = ax.plot(steps, mean, marker="o", label=label)
        if len(curves) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            for curve in curves:
                ax.plot(steps, curve, color=line.get_color(), linewidth=0.6, alpha=0.5)
    _reference_lines(ax, reference)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.set_ylim(0, 100)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    return _save(fig, path)


def plot_selection(
    diagnostics: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    title: str = "Prompt selection (mean ± std over seeds)",
) -> Path:
    """``diagnostics`` ``{method: [selection diagnostics of each seed]}`` (:mod:`.diagnostics`). Left: the
    selection accuracy per task (CODA-Prompt: the mass on its own components; usage entropy when there is
    neither) as bars with ± std; right: the
    key–query cosine per epoch over the whole run (tasks one after the other)."""
    if not diagnostics:
        raise ValueError("diagnostics is an empty mapping: need at least one method")
    fig = _new_figure(11.0, 4.2)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    width = 0.8 / len(diagnostics)
    for j, (method, runs) in enumerate(diagnostics.items()):
        key = next((k for k in ("selection_accuracy_per_task", "component_mass_share_per_task") if runs[0].get(k)),
                   "usage_entropy_per_task")
        rows = np.array([[np.nan if v is None else v for v in run.get(key) or []] for run in runs], dtype=float)
        if rows.size:
            x = np.arange(rows.shape[1])
            scale = 100.0 if key == "usage_entropy_per_task" else 1.0
            columns = [col[~np.isnan(col)] for col in rows.T]  # a task without a figure (None) is left out
            mean = np.array([col.mean() if len(col) else 0.0 for col in columns]) * scale
            err = np.array([col.std(ddof=1) if len(col) > 1 else 0.0 for col in columns]) * scale
            what = {"selection_accuracy_per_task": "selection accuracy", "component_mass_share_per_task":
                    "own-component mass"}.get(key, "usage entropy x 100")
            left.bar(x - 0.4 + (j + 0.5) * width, mean, width=width, yerr=err if len(rows) > 1 else None, capsize=2,
                     label=f"{method}: {what}")
        sims = [np.concatenate([np.asarray(e, dtype=float) for e in run["key_query_similarity_per_epoch"]])
                for run in runs if run.get("key_query_similarity_per_epoch")]
        if sims:
            curves = np.array(sims)
            steps = np.arange(1, curves.shape[1] + 1)
            (line,) = right.plot(steps, curves.mean(axis=0), marker=".", label=method)
            if len(curves) > 1:
                std = curves.std(axis=0, ddof=1)
                right.fill_between(steps, curves.mean(axis=0) - std, curves.mean(axis=0) + std,
                                   color=line.get_color(), alpha=0.15)
    left.set_xlabel("task")
    left.set_ylabel("% of the task's test selections")
    left.set_ylim(0, 100)
    left.xaxis.get_major_locator().set_params(integer=True)
    left.legend(fontsize=8)
    right.set_xlabel("epoch (all tasks in order)")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel("mean key–query cosine")
    right.grid(alpha=0.3)
    if right.lines:
        right.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
