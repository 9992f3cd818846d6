"""Benchmark session: full mode (`pytest bench/ --benchmark-only`) or smoke mode (`--benchmark-disable`,
tiny shapes, each step run once and checked against the eager reference, seconds).

In full mode the suites' rows (``record.ROWS``) are saved at the end to the machine's record,
bench/results/<machine>.json (every row with its best and median round), the machine's tables in
bench/RESULTS.md are regenerated from it (``record.update_markdown``), and they are printed with the
pool's paired-block details. The smoke run writes nothing.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import pytest
import torch

import l2p_fast
from l2p_fast import _native

from . import common, record


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


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if is_smoke(config) or not any(record.ROWS.values()):
        return
    dev = common.device()
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else _cpu_model()
    machine = record.machine_name(dev.type, device_name)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    pool_meta = dict(meta, copy_bandwidth_gbs=common.copy_bandwidth(dev))
    if dev.type == "cpu" and _native.is_built():  # outputs from this size on are written with streaming stores
        pool_meta["cpu_stream_threshold_mb"] = l2p_fast.cpu_stream_threshold() / 2**20
    saved = record.save_run(machine, {"pool": pool_meta, "models": meta})
    terminalreporter.write_sep("=", f"l2p_fast benchmarks on {machine}")
    pool_rows = record.ROWS["pool"]
    details = record.floor_lines(pool_rows) + record.compile_lines(pool_rows) + record.scatter_lines(pool_rows)
    terminalreporter.write_line(record.compact_tables(saved) + details)
    path = record.record_path(machine)
    terminalreporter.write_line(f"saved to {path}; tables regenerated in {record.RESULTS_MD}")
