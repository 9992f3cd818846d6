"""Several methods on one benchmark with one budget: each into ``output/<method>/``, then a table and plots."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .backbones import Backbone, load_backbone
from .config import METHODS, RunConfig, resolve
from .output import ensure_writable_dir, refuse_earlier_run, run_lock, write_json
from .preflight import check_backend, pick_device
from .report import comparison_table, write_comparison_plots, write_run_plots
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
    resume: bool = False,
    backbone: Backbone | None = None,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """Run every method with ``config`` (its ``method`` field replaced), print and write the comparison.

    Writes ``output/<method>/results.json`` (and that run's plots), ``output/comparison.json``,
    ``output/comparison.md`` and ``output/average_accuracy.png``. Every config is checked before the
    first run starts. With ``resume``, finished methods are read back and unfinished ones resumed.
    ``output`` is locked for the comparison's lifetime and refused when it holds an earlier run
    without ``resume`` (see :mod:`.output`).
    """
    names = parse_methods(methods)
    configs = {name: resolve(replace(config, method=name)) for name in names}
    for name in names:
        check_backend(configs[name], pick_device(configs[name].device))
    root = ensure_writable_dir(output, "output")
    refuse_earlier_run(root, resume)
    with run_lock(root):
        return _compare(names, configs, root, resume, backbone, plots)


def _compare(names: list[str], configs: dict[str, RunConfig], root: Path, resume: bool, backbone: Backbone | None,
             plots: bool) -> list[dict[str, Any]]:
    first = configs[names[0]]
    benchmark = load_run_benchmark(first)
    if backbone is None:
        kind = "text" if benchmark.modality == "text" else "vision"
        backbone = load_backbone(kind, first.backbone, first.pretrained, first.image_size)
    results = []
    for name in names:
        folder = root / name.replace("+", "_")
        done = folder / RESULTS_NAME
        if resume and done.exists():
            try:
                previous = json.loads(done.read_text())
                fingerprint = RunConfig.from_dict(previous["config"]).fingerprint()
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ValueError(f"output: cannot read the finished results {done} ({error}); delete the file to "
                                 "train that method again") from error
            if fingerprint == configs[name].fingerprint():
                log.info("%s: already finished, reading %s", name, done)
                results.append(previous)
                continue
        trainer = Trainer(configs[name], folder, resume=resume, backbone=backbone, cache_dir=root / "cache",
                          benchmark=benchmark)
        result = trainer.run()
        if plots:
            write_run_plots(result, folder)
        results.append(result)
        forgetting = "–" if result["forgetting"] is None else f"{result['forgetting']:.2f}%"
        print(f"{name}: average accuracy {result['average_accuracy']:.2f}%, forgetting {forgetting}, "
              f"{result['seconds']:.0f} s", flush=True)
    table = comparison_table(results)
    (root / "comparison.md").write_text(table + "\n")
    write_json(root / "comparison.json", {"methods": names, "results": results})
    if plots:
        write_comparison_plots(results, root)
    return results
