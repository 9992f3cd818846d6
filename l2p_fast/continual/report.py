"""Tables and figures of finished runs (matplotlib is imported only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .seeds import summarize_seeds


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± std`` of a :func:`.seeds.mean_std` entry; the mean alone for one value; ``–`` for none."""
    if stat is None:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def comparison_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per method (mean ± sample std over its seeds): seeds, average accuracy,
    forgetting, learning accuracy, trainable parameters, training examples/s, seconds."""
    lines = [
        "| method | seeds | average accuracy (%) | forgetting (%) | learning accuracy (%) | trainable params "
        "| train ex/s | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    params = {r["method"]: r.get("trainable_parameters", 0) for r in results}
    for row in summarize_seeds(results):
        lines.append(
            f"| {row['method']} | {len(row['seeds'])} | {_pm(row['average_accuracy'])} | {_pm(row['forgetting'])} | "
            f"{_pm(row['learning_accuracy'])} | {params[row['method']]:,} | "
            f"{_pm(row['train_examples_per_second'], 1)} | {_pm(row['seconds'], 0)} |"
        )
    return "\n".join(lines)


def _per_task_mean(lists: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Element-wise mean over seeds of per-task lists (None entries left out)."""
    out: list[float | None] = []
    for values in zip(*lists, strict=True):
        known = [v for v in values if v is not None]
        out.append(sum(known) / len(known) if known else None)
    return out


def diagnostics_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the prompt methods' selection diagnostics (:mod:`.diagnostics`), mean over seeds;
    an empty string when no run has any."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r.get("selection_diagnostics"):
            groups.setdefault(r["method"], []).append(r)
    if not groups:
        return ""
    summary = {row["method"]: row for row in summarize_seeds(results)}
    lines = [
        "| method | selection accuracy (%) | chance (%) | per task (%) | usage entropy | usage overlap "
        "| key–query cosine (first → last epoch) |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for method, runs in groups.items():
        diags = [r["selection_diagnostics"] for r in runs]
        key = "selection_accuracy_per_task" if diags[0].get("selection_accuracy_per_task") else \
            "component_mass_share_per_task"
        per_task = [d[key] for d in diags if d.get(key)]
        tasks = " / ".join(_fmt(v, 0) for v in _per_task_mean(per_task)) if per_task else "–"
        sims = [d["key_query_similarity_per_epoch"] for d in diags if d.get("key_query_similarity_per_epoch")]
        if sims:
            first = sum(s[0][0] for s in sims) / len(sims)
            last = sum(s[-1][-1] for s in sims) / len(sims)
            cosine = f"{first:.2f} → {last:.2f}"
        else:
            cosine = "–"
        row = summary[method]
        accuracy = row["selection_accuracy"] if row["selection_accuracy"] is not None else row["component_mass_share"]
        lines.append(f"| {method} | {_pm(accuracy, 1)} | {_fmt(_chance(runs[0]), 0)} | {tasks} | "
                     f"{_pm(row['usage_entropy'])} | "
                     f"{_pm(row['usage_overlap_mean'])} | {cosine} |")
    lines.append("")
    lines.append(DIAGNOSTICS_CAPTION)
    return "\n".join(lines)


def _chance(result: dict[str, Any]) -> float | None:
    """Selection accuracy by chance: K/M under the task mask; CODA-Prompt's ⌊M/T⌋/M of uniform weight mass."""
    diagnostics = result.get("selection_diagnostics", {})
    config = result.get("config", {})
    if diagnostics.get("selection_accuracy") is not None and config.get("top_k") and config.get("pool_size"):
        return 100.0 * config["top_k"] / config["pool_size"]
    mass = result.get("component_mass_test")
    if diagnostics.get("component_mass_share") is not None and mass:
        width = len(mass[0])
        return 100.0 * (width // len(mass)) / width
    return None


DIAGNOSTICS_CAPTION = (
    "Selection accuracy: share of a task's test-time prompt selections that are the prompts the task mask trained "
    "for it (chance: K/M; for CODA-Prompt the share of weight mass on the task's own components). Usage entropy: "
    "of each task's selection distribution, over log M (0: one prompt, 1: all alike). Usage overlap: histogram "
    "intersection of two tasks' selection distributions, mean over task pairs (1: identical). Key–query cosine: "
    "mean cosine between a query and its selected keys in the first epoch of task 1 and the last epoch of the "
    "last task."
)


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
    """average_accuracy.png: each sequential method's average-accuracy curve (mean ± std band over seeds);
    joint (mean over seeds) as a dashed line. selection.png: the prompt methods' selection diagnostics."""
    from .plots import plot_accuracy_spread, plot_selection

    runs: dict[str, list[Any]] = {}
    joint: dict[str, list[float]] = {}
    diagnostics: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r.get("forgetting") is not None:
            runs.setdefault(r["method"], []).append(r["accuracy_matrix"])
        else:
            joint.setdefault(f"{r['method']} (upper bound)", []).append(r["average_accuracy"])
        if r.get("selection_diagnostics"):
            diagnostics.setdefault(r["method"], []).append(r["selection_diagnostics"])
    written: list[Path] = []
    benchmark = results[0]["benchmark"] if results else ""
    if runs:
        reference = {label: sum(values) / len(values) for label, values in joint.items()}
        seeds = max(len(v) for v in runs.values())
        spread = f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
        written.append(plot_accuracy_spread(runs, Path(folder) / "average_accuracy.png", reference=reference,
                                            title=f"{benchmark}: average accuracy on the tasks seen so far{spread}"))
    if diagnostics:
        written.append(plot_selection(diagnostics, Path(folder) / "selection.png",
                                      title=f"{benchmark}: prompt selection on the test sets"))
    return written
