"""``make gpu-check``: on a machine with a CUDA GPU, run the test suite and a short benchmark (≤ ~5 min) and
write a summary.

1. ``pytest tests`` — the whole suite: with a GPU present the (backend, device) tests also run the ``cuda``
   and ``triton`` backends on CUDA tensors (tests/conftest.py sets TRITON_INTERPRET only without a GPU).
2. The prompt pool, forward and forward + backward, at the L2P shape (B=64, N=196, D=768, M=10, K=5,
   Lp=5, batch vote, cls query): eager reference, ``torch.compile`` of it, and every fused backend.
3. One training step of the prompted ViT-B/16 (random weights, B=16): the upstream-style model against ours.

Writes ``summary.md`` and ``tests.xml`` (JUnit) into ``--output`` (default ``$OUT`` when set, else
``gpu-check/``). Without a GPU it stops at once with exit status 2 and says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NO_GPU = "gpu-check: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); run it on a machine "\
         "with an NVIDIA GPU and a CUDA build of torch"
TEST_TIMEOUT_S = 200
ROUNDS = 20
VIT_B16 = "vit-b16-img224"


def gpu_missing_reason() -> str | None:
    """Why the check cannot run here (None when a CUDA device is usable)."""
    try:
        import torch
    except ImportError:
        return "gpu-check: torch is not installed (run `make install` first)"
    return None if torch.cuda.is_available() else NO_GPU


def run_tests(output: Path, timeout_s: int = TEST_TIMEOUT_S) -> tuple[int, str]:
    """The whole test suite; returns (exit status, pytest's last summary line)."""
    command = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:benchmark", "-p", "no:cacheprovider",
               f"--junitxml={output / 'tests.xml'}"]
    try:
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stdout or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        (output / "tests.log").write_text(tail)
        return 124, f"timed out after {timeout_s} s"
    (output / "tests.log").write_text(run.stdout[-200_000:] + run.stderr[-20_000:])
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return run.returncode, lines[-1] if lines else "(no output)"


def median_ms(step: Callable[[], object], dev, rounds: int = ROUNDS, warmup: int = 3) -> float:
    """Median over ``rounds`` of one call: CUDA events on a GPU, the wall clock on the CPU (the script's own test)."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        if dev.type != "cuda":
            start_s = time.perf_counter()
            step()
            times.append((time.perf_counter() - start_s) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_pool(dev, smoke: bool = False, rounds: int = ROUNDS) -> list[str]:
    """Markdown rows: provider, mode, ms, speed-up over eager at the L2P shape (B=64; ``smoke``: the bench's tiny
    smoke shape, for the script's own test on the CPU)."""
    sys.path.insert(0, str(REPO))
    from bench import common

    shape = common.SMOKE_SHAPES[0] if smoke else common.Shape(64, 196, 768, 10, 5, 5)
    rows = ["| provider | mode | ms | × eager |", "| --- | --- | ---: | ---: |"]
    for mode in ("forward", "forward+backward"):
        eager = None
        for provider in common.provider_names(dev.type, with_compile=True):
            try:
                pool, forward = common.make_pool(shape, provider, dev)
                inputs = common.make_inputs(shape, dev, requires_grad=mode != "forward")
                ms = median_ms(common.step_fn(pool, forward, inputs, mode), dev, rounds)
            except Exception as error:  # noqa: BLE001 - a failing provider is reported, the others still run
                rows.append(f"| {provider} | {mode} | error: {type(error).__name__}: {str(error)[:120]} | |")
                continue
            eager = ms if provider == "eager" else eager
            rows.append(f"| {provider} | {mode} | {ms:.3f} | {eager / ms if eager else float('nan'):.2f} |")
    return rows


def bench_vit_step(dev, config: str = VIT_B16, rounds: int = 10) -> list[str]:
    """Markdown rows: one L2P training step of a prompted ViT (random weights; default ViT-B/16 at B=16),
    upstream-style vs ours."""
    sys.path.insert(0, str(REPO))
    from bench import test_bench_models as models

    models.VIT_CONFIGS.setdefault(VIT_B16, ({"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12,
                                             "num_heads": 12}, 16))
    up, ours, images, labels = models.vit_pair(config, smoke=False)
    up, ours = up.to(dev), ours.to(dev)
    images, labels = images.to(dev), labels.to(dev)
    steps = {
        "upstream": models.train_step(lambda: up(images), [up.prompt.prompt, up.prompt.prompt_key,
                                                           *up.head.parameters()], labels),
        "ours": models.train_step(lambda: ours(images), ours.trainable_parameters(), labels),
    }
    rows = [f"| model step (B={images.shape[0]}) | ms | × upstream |", "| --- | ---: | ---: |"]
    base = None
    for name, step in steps.items():
        ms = median_ms(step, dev, rounds)
        base = ms if base is None else base
        rows.append(f"| {name} | {ms:.2f} | {base / ms:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.environ.get("OUT") or str(REPO / "gpu-check"))
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    args = parser.parse_args(argv)
    reason = gpu_missing_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    import torch
    import triton

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lines = [
        "# gpu-check", "",
        f"- device: {torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
        f"Python {platform.python_version()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
    ]
    status = 0
    if not args.skip_tests:
        code, summary = run_tests(output)
        status = status or code
        lines += ["## Tests", "", f"`pytest tests` exit status {code}: {summary} (log: tests.log, tests.xml)", ""]
    dev = torch.device("cuda")
    for title, bench in (("Pool (B=64, N=196, D=768, M=10, K=5, Lp=5)", bench_pool), ("ViT-B/16 step", bench_vit_step)):
        try:
            rows = bench(dev)
        except Exception as error:  # noqa: BLE001 - the summary says what failed
            rows, status = [f"error: {type(error).__name__}: {error}"], status or 1
        lines += [f"## {title}", "", *rows, ""]
    lines.append(f"Total {time.perf_counter() - start:.0f} s.")
    (output / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
