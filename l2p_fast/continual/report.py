"""Tables and figures of finished runs (matplotlib is imported only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def comparison_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: method, average accuracy, forgetting, trainable parameters, seconds."""
    lines = [
        "| method | average accuracy (%) | forgetting (%) | trainable params | train ex/s | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {_fmt(r['average_accuracy'])} | {_fmt(r['forgetting'])} | "
            f"{r.get('trainable_parameters', 0):,} | {_fmt(r.get('train_examples_per_second'), 1)} | "
            f"{_fmt(r['seconds'], 0)} |"
        )
    return "\n".join(lines)


def write_run_plots(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """accuracy_matrix.png and task_accuracy.png (sequential methods), prompt_usage.png (prompt methods)."""
    from .plots import plot_accuracy_matrix, plot_prompt_usage, plot_task_accuracy

    folder = Path(folder)
    written: list[Path] = []
    name = f"{results['method']} on {results['benchmark']}"
    matrix = results["accuracy_matrix"]
    if results.get("forgetting") is not None:  # a full lower triangle (not joint)
        written.append(plot_accuracy_matrix(matrix, folder / "accuracy_matrix.png", title=f"{name}: accuracy (%)"))
        written.append(
            plot_task_accuracy(matrix, folder / "task_accuracy.png", title=f"{name}: accuracy after each task")
        )
    counts = results.get("prompt_counts_test")
    if counts is not None and any(any(row) for row in counts):
        written.append(plot_prompt_usage(counts, folder / "prompt_usage.png",
                                         title=f"{name}: prompt selection frequency per task (test sets)"))
    return written


def write_comparison_plots(results: Sequence[dict[str, Any]], folder: str | Path) -> list[Path]:
    """average_accuracy.png: the average-accuracy curve of every sequential method; joint as a dashed line."""
    from .plots import plot_task_accuracy

    curves = {r["method"]: r["accuracy_matrix"] for r in results if r.get("forgetting") is not None}
    if not curves:
        return []
    benchmark = results[0]["benchmark"]
    reference = {f"{r['method']} (upper bound)": r["average_accuracy"] for r in results if r.get("forgetting") is None}
    return [plot_task_accuracy(curves, Path(folder) / "average_accuracy.png",
                               title=f"{benchmark}: average accuracy on the tasks seen so far", reference=reference)]
