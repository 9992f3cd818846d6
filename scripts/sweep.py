"""Choose every demo method's settings on the validation split of ``wordnet20``, with the same budget per method.

The grid (``GRID``): per method a learning-rate axis and, where the method has one, its key knob. Each
method gets ``TRIALS`` trials, the same number for every method:

1. the learning rates of its ``lr`` list at the knob's first (default) value (3 runs);
2. the knob's other value at the best of those learning rates (1 run); a method without a knob gets a
   fourth learning rate instead.

Every trial trains on the validation split's training part (``VALIDATION_FRACTION`` of each class's
training examples held out, :mod:`l2p_fast.continual.benchmarks.validation`) with the demo's budget
(``BASE``) and seed(s), and is scored by its final average accuracy on the held-out part (mean over the
seeds); the best trial wins (ties: the earlier trial). The test set is never read. Then a budget probe:
the winner once more with ``PROBE_EPOCHS`` epochs per task, reported (never chosen automatically), so the
record says where more training would matter.

Writes ``sweeps/wordnet20.json`` (grid, budget, every trial, the choice), ``sweeps/wordnet20.md`` (the
same as tables) and ``sweeps/wordnet20_demo.json``, the settings file ``make demo`` passes to
``l2p-fast compare --config``. Runs land in ``--output`` and are resumed (``--resume``) when interrupted.

Usage: ``python scripts/sweep.py [--methods l2p,er] [--seeds 0] [--output runs/sweep] [--write sweeps]
[--set field=value ...] [--probe l2p,er | --no-probe] [--no-knob]``. ``--set`` changes the base config (tests use
a tiny backbone); ``--no-knob`` keeps only the learning-rate stage (``LR_ONLY_TRIALS`` rates for every method).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from l2p_fast.continual.backbones import load_backbone
from l2p_fast.continual.compare import finished_results, parse_methods
from l2p_fast.continual.config import RunConfig, resolve
from l2p_fast.continual.output import write_bytes_atomic, write_json
from l2p_fast.continual.seeds import parse_seeds
from l2p_fast.continual.trainer import RESULTS_NAME, Trainer, load_run_benchmark

BENCHMARK = "wordnet20"
VALIDATION_FRACTION = 0.25
TRIALS = 4
LR_ONLY_TRIALS = 3  # --no-knob: the first three learning rates of every method
PROBE_EPOCHS = 2
# the demo's budget and shared settings (wordnet20's default subset sizes and epochs, batch 8)
BASE: dict[str, Any] = {"benchmark": BENCHMARK, "batch_size": 8, "progress": False, "checkpoint_every": 0}
# fixed per-method settings (not swept): L2P as in the demo (2 of 10 prompts per input, task mask, mean-pooled head)
FIXED: dict[str, dict[str, Any]] = {
    "l2p": {"top_k": 2, "use_prompt_mask": True, "head_type": "gap"},
    "l2p+er": {"top_k": 2, "use_prompt_mask": True, "head_type": "gap"},
}
# per method: learning rates (the first three, then a fourth when there is no knob) and the knob (field, values)
GRID: dict[str, dict[str, Any]] = {
    "l2p": {"lr": [0.01, 0.03, 0.1], "knob": ("pull_lambda", [0.1, 1.0])},
    "l2p+er": {"lr": [0.01, 0.03, 0.1], "knob": ("pull_lambda", [0.1, 1.0])},
    "dualprompt": {"lr": [0.01, 0.03, 0.1], "knob": ("pull_lambda", [0.1, 1.0])},
    "coda-prompt": {"lr": [0.003, 0.01, 0.03, 0.1]},
    "seq": {"lr": [1e-5, 3e-5, 1e-4, 3e-4]},
    "seq-frozen": {"lr": [0.003, 0.01, 0.03, 0.1]},
    "ewc": {"lr": [3e-5, 1e-4, 3e-4], "knob": ("ewc_lambda", [1e5, 1e7])},
    "er": {"lr": [3e-5, 1e-4, 3e-4], "knob": ("replay_batch_size", [8, 16])},
    "joint": {"lr": [1e-5, 3e-5, 1e-4, 3e-4]},
}
# the demo's methods (seq and ewc, which fine-tune the whole encoder and forget almost everything here, are left
# out of the demo for its time budget; --methods seq,ewc sweeps them too)
DEMO_METHODS = ("l2p", "dualprompt", "coda-prompt", "seq-frozen", "er", "joint")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["field=value", ...]`` → config fields (values read as JSON when they parse, else as strings)."""
    known = {f.name for f in fields(RunConfig)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--set: expected field=value with a RunConfig field, got {item!r}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


class Sweep:
    """Runs the trials of one sweep (shared backbone, benchmark and feature cache; finished trials read back)."""

    def __init__(self, base: dict[str, Any], seeds: list[int], output: Path, knob: bool = True) -> None:
        self.base = base
        self.seeds = seeds
        self.output = output
        self.knob = knob  # False: the learning-rate stage only, LR_ONLY_TRIALS rates for every method
        first = resolve(RunConfig(**{**base, "method": "seq-frozen", "validation_fraction": VALIDATION_FRACTION}))
        self.benchmark = load_run_benchmark(first)
        self.backbone = load_backbone("text", first.backbone, first.pretrained, first.image_size)
        self.trials: list[dict[str, Any]] = []

    def run(self, method: str, settings: dict[str, Any], stage: str) -> dict[str, Any]:
        """One trial: ``settings`` over the base, on every seed; its record (scores are means over the seeds)."""
        runs = []
        for seed in self.seeds:
            config = resolve(RunConfig(**{**self.base, **FIXED.get(method, {}), **settings, "method": method,
                                          "seed": seed, "validation_fraction": VALIDATION_FRACTION}))
            name = "_".join(f"{k}{v}" for k, v in sorted(settings.items())) or "default"
            folder = self.output / method.replace("+", "_") / f"{name}_seed{seed}"
            previous = finished_results(folder / RESULTS_NAME, config)
            if previous is None:
                trainer = Trainer(config, folder, resume=True, backbone=self.backbone, benchmark=self.benchmark,
                                  cache_dir=self.output / "cache")
                previous = trainer.run()
            runs.append(previous)

        def mean(key: str) -> float | None:
            values = [r[key] for r in runs if r.get(key) is not None]
            return sum(values) / len(values) if values else None

        record = {"method": method, "stage": stage, "settings": settings, "validation_accuracy": mean(
            "average_accuracy"), "forgetting": mean("forgetting"), "learning_accuracy": mean("learning_accuracy"),
            "seconds": mean("seconds")}
        self.trials.append(record)
        print(f"{method} {settings}: validation accuracy {record['validation_accuracy']:.2f}% "
              f"({record['seconds']:.0f} s)", flush=True)
        return record

    def method(self, method: str, probe: bool) -> dict[str, Any]:
        """The method's ``TRIALS`` trials (``LR_ONLY_TRIALS`` without the knob stage); returns its chosen settings."""
        grid = GRID.get(method, {"lr": [None]})
        knob = grid.get("knob")
        lrs = grid["lr"][:3] if knob or not self.knob else grid["lr"][:TRIALS]
        start = {knob[0]: knob[1][0]} if knob else {}  # the knob's first (default) value, also without its stage
        records = [self.run(method, {"lr": lr, **start} if lr is not None else dict(start), "lr") for lr in lrs]
        best = max(records, key=lambda r: r["validation_accuracy"])  # max keeps the first of equal scores
        if knob and self.knob:
            for value in knob[1][1:]:
                record = self.run(method, {**best["settings"], knob[0]: value}, "knob")
                if record["validation_accuracy"] > best["validation_accuracy"]:
                    best = record
        if probe:
            self.run(method, {**best["settings"], "epochs": PROBE_EPOCHS}, "probe")
        return dict(best["settings"])


def markdown(record: dict[str, Any]) -> str:
    """``sweeps/wordnet20.md``: what was swept and every trial, per method."""
    lines = [
        f"# Validation sweep on {record['benchmark']}",
        "",
        "Generated by `scripts/sweep.py` (the grid, the rule and the budget are in its docstring); every number is "
        f"the final average accuracy on the validation split ({record['validation_fraction']:.0%} of each class's "
        f"training examples held out; the test set is never read), seeds {record['seeds']}, mean over seeds. "
        f"Budget per trial: {json.dumps(record['budget'])}; {record['trials_per_method']} trials per method; the "
        f"probe with {PROBE_EPOCHS} epochs per task ({', '.join(record['probed']) or 'none'}) is reported, not chosen. "
        f"The trials' wall time: {record['seconds']:.0f} s in all on {record['machine']}, shared with other "
        "work (the seconds measure the machine's load as much as the methods). One validation example is "
        f"{100 / record['validation_examples']:.1f} points of accuracy here ({record['validation_examples']} "
        "examples), so differences of a few points between trials are within the noise of one seed.",
        "",
        "| method | stage | settings | validation accuracy (%) | forgetting (%) | learning accuracy (%) | seconds "
        "| chosen |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for t in record["trials"]:
        chosen = "✓" if t["settings"] == record["best"][t["method"]] and t["stage"] != "probe" else ""

        def fmt(v: float | None) -> str:
            return "–" if v is None else f"{v:.2f}"

        settings = ", ".join(f"{k}={v}" for k, v in t["settings"].items())
        lines.append(f"| {t['method']} | {t['stage']} | {settings} | {fmt(t['validation_accuracy'])} | "
                     f"{fmt(t['forgetting'])} | {fmt(t['learning_accuracy'])} | {t['seconds']:.0f} | {chosen} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from l2p_fast.continual.config import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_methods = ",".join(m for m in DEMO_METHODS if m in METHODS)
    parser.add_argument("--methods", default=default_methods, help=f"default: {default_methods}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--output", default="runs/sweep", help="folder of the trials' runs")
    parser.add_argument("--write", default="sweeps", help="folder for wordnet20.json/.md and wordnet20_demo.json")
    parser.add_argument("--set", action="append", default=[], help="field=value over the base config")
    parser.add_argument("--probe", default=None,
                        help=f"methods that get the {PROBE_EPOCHS}-epoch budget probe (default: every swept method)")
    parser.add_argument("--no-probe", action="store_true", help=f"skip the {PROBE_EPOCHS}-epoch budget probe")
    parser.add_argument("--no-knob", action="store_true",
                        help=f"learning rates only: the first {LR_ONLY_TRIALS} of every method (a smaller sweep)")
    args = parser.parse_args(argv)
    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    base = {**BASE, **parse_sets(args.set)}
    sweep = Sweep(base, seeds, Path(args.output), knob=not args.no_knob)
    probed = set(parse_methods(args.probe)) if args.probe else set(methods)
    best: dict[str, dict[str, Any]] = {}
    for method in methods:  # the files are rewritten after every method, so a cut-short sweep leaves its choices
        best[method] = sweep.method(method, not args.no_probe and method in probed)
        write_outputs(args, base, seeds, list(best), best, sweep, probed)
    return 0


def write_outputs(args: argparse.Namespace, base: dict[str, Any], seeds: list[int], methods: list[str],
                  best: dict[str, dict[str, Any]], sweep: Sweep, probed: set[str]) -> None:
    """Write wordnet20.json / .md / _demo.json for the methods swept so far."""
    budget = {k: v for k, v in resolve(RunConfig(**{**base, "method": "seq-frozen"})).to_dict().items()
              if k in ("epochs", "train_per_class", "test_per_class", "batch_size", "precision")}
    record = {
        "benchmark": BENCHMARK, "validation_fraction": VALIDATION_FRACTION, "seeds": seeds, "budget": budget,
        "trials_per_method": TRIALS if sweep.knob else LR_ONLY_TRIALS,
        "grid": {m: {"lr": GRID[m]["lr"], "knob": GRID[m].get("knob") if sweep.knob else None} for m in methods
                 if m in GRID},
        "fixed": {m: FIXED[m] for m in methods if m in FIXED},
        "rule": "best final average accuracy on the validation split (mean over seeds); ties: the earlier trial",
        "probed": [] if args.no_probe else [m for m in methods if m in probed],
        "validation_examples": sum(len(d) for d in sweep.benchmark.test),
        "trials": [t for t in sweep.trials if t["method"] in methods], "best": best,
        "seconds": sum(t["seconds"] for t in sweep.trials),  # the trials' own wall time (a re-run reads them back)
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    out = Path(args.write)
    write_json(out / f"{BENCHMARK}.json", record)
    write_bytes_atomic(out / f"{BENCHMARK}.md", markdown(record).encode())
    shared = {k: v for k, v in base.items() if k not in ("progress", "checkpoint_every")}
    write_json(out / f"{BENCHMARK}_demo.json", {
        "description": f"The demo's settings: chosen per method on {BENCHMARK}'s validation split by "
                       f"scripts/sweep.py (sweeps/{BENCHMARK}.md); evaluated on the test set.",
        "source": f"sweeps/{BENCHMARK}.json",
        "config": shared,
        "methods": {m: {**FIXED.get(m, {}), **best[m]} for m in methods},
    })
    print(f"wrote {out / (BENCHMARK + '.json')}, {out / (BENCHMARK + '.md')}, {out / (BENCHMARK + '_demo.json')}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
