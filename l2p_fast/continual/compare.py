"""Several methods on one benchmark with one budget, over one seed or several: each run into its folder, then
the table (mean ± std over seeds), the selection diagnostics and the plots."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .backbones import Backbone, load_backbone
from .config import METHODS, RunConfig, resolve
from .output import ensure_writable_dir, refuse_earlier_run, run_lock, write_json
from .preflight import check_backend, pick_device
from .report import comparison_table, diagnostics_table, write_comparison_plots, write_run_plots
from .seeds import parse_seeds, summarize_seeds
from .trainer import RESULTS_NAME, Trainer, load_run_benchmark

log = logging.getLogger(__name__)


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"l2p,seq"`` or a list → validated, de-duplicated method names (``ValueError`` names the bad one)."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m) for m in methods]
    names = [m for m in names if m]
    if not names:
        raise ValueError(f"methods: expected a comma-separated list from {list(METHODS)}, got {methods!r}")
    for name in names:
        if name not in METHODS:
            raise ValueError(f"methods: unknown method {name!r}; expected names from {list(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods: {names} names a method twice")
    return names


def compare(
    methods: str | Sequence[str],
    config: RunConfig,
    output: str | Path,
    *,
    seeds: str | Sequence[int] | None = None,
    method_settings: Mapping[str, Mapping[str, Any]] | None = None,
    resume: bool = False,
    backbone: Backbone | None = None,
    plots: bool = True,
    settings_file: str | None = None,
) -> list[dict[str, Any]]:
    """Run every method with ``config`` (its ``method`` field replaced), print and write the comparison.

    ``method_settings[name]``: config fields of that method only (e.g. its validation-chosen ``lr``);
    ``settings_file``: where they came from, recorded in ``comparison.json``.
    Without ``seeds`` each method runs once (``config.seed``) into ``output/<method>/``; with ``seeds``
    (``"0,1,2"`` or a list) once per seed into ``output/seed<N>/<method>/``, the class order fixed
    (:mod:`.seeds`). Writes each run's ``results.json`` and plots, ``output/comparison.json`` (every run's
    results, and per method the mean ± std of each figure), ``output/comparison.md`` and the comparison
    plots. Every config is checked before the first run starts. With ``resume``, finished runs are read
    back and unfinished ones resumed. ``output`` is locked for the comparison's lifetime and refused when
    it holds an earlier run without ``resume`` (see :mod:`.output`).
    """
    names = parse_methods(methods)
    settings = {name: dict(values) for name, values in (method_settings or {}).items()}
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"method_settings: names methods {unknown} that are not compared ({names})")
    seed_list = None if seeds is None else parse_seeds(seeds)
    runs: list[tuple[Path | str, RunConfig]] = []
    for seed in seed_list if seed_list is not None else [config.seed]:
        for name in names:
            folder = name.replace("+", "_") if seed_list is None else f"seed{seed}/{name.replace('+', '_')}"
            runs.append((folder, resolve(replace(config, method=name, seed=seed, **settings.get(name, {})))))
    for _, run_config in runs:
        check_backend(run_config, pick_device(run_config.device))
    root = ensure_writable_dir(output, "output")
    refuse_earlier_run(root, resume)
    with run_lock(root):
        return _compare(names, seed_list, runs, root, resume, backbone, plots, settings_file)


def finished_results(done: Path, config: RunConfig) -> dict[str, Any] | None:
    """The finished results in ``done`` when they belong to ``config``, else None. A finished run records its
    precision resolved ('auto' → this machine's choice, as the trainer does), so ``config`` is compared so too."""
    from ..models.precision import resolve_precision

    if not done.exists():
        return None
    config = replace(config, precision=resolve_precision(config.precision, pick_device(config.device)))
    try:
        previous = json.loads(done.read_text())
        fingerprint = RunConfig.from_dict(previous["config"]).fingerprint()
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"output: cannot read the finished results {done} ({error}); delete the file to "
                         "train that method again") from error
    return previous if fingerprint == config.fingerprint() else None


def _compare(names: list[str], seeds: list[int] | None, runs: list[tuple[Path | str, RunConfig]], root: Path,
             resume: bool, backbone: Backbone | None, plots: bool, settings_file: str | None) -> list[dict[str, Any]]:
    first = runs[0][1]
    benchmark = load_run_benchmark(first)
    if backbone is None:
        kind = "text" if benchmark.modality == "text" else "vision"
        backbone = load_backbone(kind, first.backbone, first.pretrained, first.image_size)
    results = []
    for folder_name, config in runs:
        folder = root / folder_name
        label = config.method if seeds is None else f"{config.method} (seed {config.seed})"
        previous = finished_results(folder / RESULTS_NAME, config) if resume else None
        if previous is not None:
            log.info("%s: already finished, reading %s", label, folder / RESULTS_NAME)
            results.append(previous)
            continue
        same = _benchmark_options(config) == _benchmark_options(first)
        run_benchmark = benchmark if same else load_run_benchmark(config)
        trainer = Trainer(config, folder, resume=resume, backbone=backbone, cache_dir=root / "cache",
                          benchmark=run_benchmark)
        result = trainer.run()
        if plots:
            write_run_plots(result, folder)
        results.append(result)
        forgetting = "–" if result["forgetting"] is None else f"{result['forgetting']:.2f}%"
        learned = result.get("learning_accuracy")
        learned = "–" if learned is None else f"{learned:.2f}%"
        print(f"{label}: average accuracy {result['average_accuracy']:.2f}%, forgetting {forgetting}, "
              f"learning accuracy {learned}, {result['seconds']:.0f} s", flush=True)
    table = comparison_table(results) + "\n\n" + diagnostics_table(results)
    (root / "comparison.md").write_text(table.strip() + "\n")
    write_json(root / "comparison.json", {
        "methods": names,
        "seeds": seeds if seeds is not None else [first.seed],
        "class_order": "fixed across seeds (the benchmark's order"
                       + (f", class_order_seed {first.class_order_seed})" if first.class_order_seed is not None
                          else ")"),
        "evaluated_on": "validation split" if first.validation_fraction else "test set",
        "settings_file": settings_file,
        "results": results,
        "summary": summarize_seeds(results),
    })
    if plots:
        write_comparison_plots(results, root)
    return results


def _benchmark_options(config: RunConfig) -> tuple[Any, ...]:
    """The config fields that shape the benchmark (a method's settings may change its subset sizes)."""
    return (config.benchmark, config.data, config.classes_per_task, config.class_order_seed,
            config.train_per_class, config.test_per_class, config.validation_fraction, config.image_size)
