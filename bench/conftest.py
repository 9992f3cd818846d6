"""Benchmark session: full mode (`pytest bench/ --benchmark-only`) or smoke mode (`--benchmark-disable`,
tiny shapes, each step run once and checked against the eager reference, seconds).

In full mode the measured table is printed at the end and saved to bench/results/pool_<device>.json
and .md (time, speed-up over eager, distance to the floor, GB/s, bytes moved, peak memory). Times in
the table are the minimum over the rounds (robust to other processes on a shared machine); speed-ups
are given on the minimum and on the median round (the JSON holds both times), because the eager
step's own time is widely spread: its best round is far from its typical one.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

import l2p_fast
from l2p_fast import _native

from . import common

RESULTS: list[dict] = []
RESULTS_DIR = Path(__file__).parent / "results"


def is_smoke(config: pytest.Config) -> bool:
    """Smoke mode: benchmarks disabled (or L2P_BENCH_SMOKE=1)."""
    return bool(config.getoption("benchmark_disable", False)) or os.environ.get("L2P_BENCH_SMOKE") == "1"


def pytest_configure(config: pytest.Config) -> None:
    threads = os.environ.get("L2P_BENCH_THREADS")
    if threads:  # e.g. 1 when another process holds a core: waiting for a descheduled thread costs a time slice
        torch.set_num_threads(int(threads))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    smoke = is_smoke(metafunc.config)
    dev = common.device()
    shapes = common.SMOKE_SHAPES if smoke else common.FULL_SHAPES
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", shapes, ids=[s.name for s in shapes])
    if "provider" in metafunc.fixturenames:
        providers = common.provider_names(dev.type, with_compile=not smoke)
        metafunc.parametrize("provider", providers)


@pytest.fixture(scope="session")
def smoke(request: pytest.FixtureRequest) -> bool:
    return is_smoke(request.config)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


BACKWARD_MODES = (("forward_backward", "fwd+bwd (x frozen)"), ("forward_backward_x", "fwd+bwd (x trainable)"))


def _table(rows: list[dict], copy_gbs: float) -> str:
    by_key = {(r["shape"], r["provider"], r["mode"]): r for r in rows}

    def speedup(eager: dict | None, row: dict | None, stat: str) -> str:
        """eager / provider of one statistic: 'min_ms' (best round) or 'ms' (median round)."""
        return f"{eager[stat] / row[stat]:.2f}" if eager and row else ""

    def recorded_ratios(shape: str, provider: str, mode: str) -> list[str]:
        """The eager / provider ratios recorded by the 'paired' and the 'interleaved' benchmarks."""
        rows = (by_key.get((shape, provider, f"{kind}_{mode}")) for kind in ("paired", "interleaved"))
        return [f"{row['ratio']:.2f}" if row else "" for row in rows]

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    floors = {"floor": "floor (alloc + write once)", "floor-reused": "floor (write once, reused buffer)"}
    timed = [r for r in rows if r["provider"] not in floors and r["mode"] != "scatter"]  # the step floor included
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    header = ["shape", "provider", "fwd ms", "fwd × eager", "fwd × eager, median", "fwd × eager, paired",
              "fwd × eager, interleaved", "fwd / floor", "fwd / reused floor", "fwd GB/s", "MB moved (fwd)"]
    for _, label in BACKWARD_MODES:
        header += [f"{label} ms", "× eager", "× eager, median", "× eager, paired", "× eager, interleaved", "peak MB"]
    lines = [
        f"copy bandwidth (read + write): {copy_gbs:.1f} GB/s",
        "",
        "| " + " | ".join(header) + " |",
        "| --- | --- |" + " ---: |" * (len(header) - 2),
    ]
    for shape in shapes:
        floor = by_key.get((shape, "floor", "forward"))
        reused = by_key.get((shape, "floor-reused", "forward"))
        eager_f = by_key.get((shape, "eager", "forward"))

        def ratios(ms: float, floor: dict | None = floor, reused: dict | None = reused) -> list[str]:
            return [f"{ms / floor['min_ms']:.2f}" if floor else "", f"{ms / reused['min_ms']:.2f}" if reused else ""]

        for name, label in floors.items():
            row = by_key.get((shape, name, "forward"))
            if row:
                cells = [shape, label, f"{row['min_ms']:.3f}", "", "", "", "", *ratios(row["min_ms"]),
                         f"{row['bytes'] / row['min_ms'] / 1e6:.1f}", f"{row['bytes'] / 1e6:.1f}"]
                lines.append("| " + " | ".join(cells + [""] * (len(header) - len(cells))) + " |")
        for provider in providers:
            if not any(by_key.get((shape, provider, mode)) for mode in ("forward", *dict(BACKWARD_MODES))):
                continue
            f = by_key.get((shape, provider, "forward"))
            cells = [shape, provider]
            if f:
                cells += [f"{f['min_ms']:.3f}", speedup(eager_f, f, "min_ms"), speedup(eager_f, f, "ms"),
                          *recorded_ratios(shape, provider, "forward"),
                          *ratios(f["min_ms"]),
                          f"{f['bytes'] / f['min_ms'] / 1e6:.1f}", f"{f['bytes'] / 1e6:.1f}"]
            else:
                cells += [""] * 9
            for mode, _ in BACKWARD_MODES:
                b = by_key.get((shape, provider, mode))
                eager_b = by_key.get((shape, "eager", mode))
                mem = by_key.get((shape, provider, f"peak_{mode}"))
                cells += [f"{b['min_ms']:.3f}" if b else "", speedup(eager_b, b, "min_ms"), speedup(eager_b, b, "ms"),
                          *recorded_ratios(shape, provider, mode),
                          f"{mem['bytes'] / 1e6:.1f}" if mem and mem["bytes"] is not None else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _floor_lines(rows: list[dict]) -> str:
    """Per mode with a floor in the paired blocks (common.PAIRED_FLOORS), one line per shape: eager / floor (median
    over turns), for the L2P step the turns in which the floor is less than 4x faster than eager, and each other
    provider / floor in the same turns."""
    titles = {"forward": "Forward against its floor (alloc + write once), paired blocks (median over turns):",
              "forward_backward": "L2P step (x frozen) against its floor, paired blocks (median over turns):"}
    sections = []
    for mode, floor in common.PAIRED_FLOORS.items():
        lines = []
        for row in rows:
            if row["provider"] != floor or row["mode"] != f"paired_{mode}":
                continue
            below_text = ""
            if mode == "forward_backward":  # the step's target: 4x eager
                below = sum(ratio < 4 for ratio in row["turn_ratios"])
                below_text = f" (below 4 in {below} of {len(row['turn_ratios'])} turns)"
            others = [r for r in rows if r["shape"] == row["shape"] and r["mode"] == row["mode"] and "over_floor" in r]
            over = ", ".join(f"{r['provider']} / floor {r['over_floor']:.2f}" for r in others)
            lines.append(f"- {row['shape']}: eager / floor {row['ratio']:.2f}{below_text}; {over}")
        if lines:
            sections.append("\n\n" + titles[mode] + "\n" + "\n".join(lines))
    return "".join(sections)


def _compile_lines(rows: list[dict]) -> str:
    """One line per shape and mode: each fused provider's speed-up over torch.compile in the paired blocks (median
    over turns of compile's best round / the provider's, both right after an eager block in the same turn)."""
    lines = [f"- {r['shape']} {r['mode'].removeprefix('paired_')}: {r['provider']} {r['over_compile']:.2f}×"
             for r in rows if "over_compile" in r]  # fmt: skip
    if not lines:
        return ""
    title = "Speed-up over torch.compile, paired blocks (median over turns of compile / provider):"
    return "\n\n" + title + "\n" + "\n".join(lines)


def _scatter_lines(rows: list[dict]) -> str:
    """One line per shape: best and median round of the eager backward's index_put scatter alone."""
    lines = [f"- {r['shape']}: min {r['min_ms']:.3f} ms, median {r['ms']:.3f} ms "
             f"(median / min {r['ms'] / r['min_ms']:.2f})" for r in rows if r["mode"] == "scatter"]
    if not lines:
        return ""
    return "\n\neager prompt-gradient scatter alone (index_put, accumulate=True):\n" + "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not RESULTS or is_smoke(config):
        return
    dev = common.device()
    copy_gbs = common.copy_bandwidth(dev)
    table = _table(RESULTS, copy_gbs)
    terminalreporter.write_sep("=", "l2p_fast prompt-pool benchmark")
    table += _floor_lines(RESULTS) + _compile_lines(RESULTS) + _scatter_lines(RESULTS)
    terminalreporter.write_line(table)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else _cpu_model(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "copy_bandwidth_gbs": copy_gbs,
    }
    if dev.type == "cpu" and _native.is_built():  # outputs from this size on are written with streaming stores
        meta["cpu_stream_threshold_mb"] = l2p_fast.cpu_stream_threshold() / 2**20
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"pool_{dev.type}.json").write_text(json.dumps({"meta": meta, "results": RESULTS}, indent=1))
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (RESULTS_DIR / f"pool_{dev.type}.md").write_text(header + "\n\n" + table + "\n")
    terminalreporter.write_line(f"saved to {RESULTS_DIR}/pool_{dev.type}.json and .md")
