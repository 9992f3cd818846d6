"""``make gpu-check`` and ``scripts/gpu_check.py`` on a machine without a GPU: a clear message, exit status 2, at once."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: gpu-check would really run")


def test_script_refuses_without_a_gpu(tmp_path: Path) -> None:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "gpu-check: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)" in run.stderr
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - start < 60


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_target_refuses_without_a_gpu(tmp_path: Path) -> None:
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi and subprocess.run([nvidia_smi, "-L"], capture_output=True).returncode == 0:
        pytest.skip("nvidia-smi lists a GPU here although torch sees none")
    start = time.perf_counter()
    run = subprocess.run(["make", "--no-print-directory", "gpu-check", f"OUT={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "gpu-check: no NVIDIA GPU found" in run.stderr
    assert "pip install" not in run.stdout  # stopped before installing anything
    assert time.perf_counter() - start < 10


def test_benchmark_parts_run_on_cpu_at_tiny_sizes() -> None:
    """The bench functions of gpu_check.py on CPU tensors, tiny shapes and a tiny ViT: every provider gives a row."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_for_test", REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rows = gpu_check.bench_pool(torch.device("cpu"), smoke=True, rounds=1)
    assert not [row for row in rows if "error" in row], rows
    forward = [row.split("|")[1].strip() for row in rows if "| forward |" in row]
    assert forward[:2] == ["eager", "compile"] and len(forward) >= 3, rows
    assert len([row for row in rows if "| forward+backward |" in row]) == len(forward)
    rows = gpu_check.bench_vit_step(torch.device("cpu"), "vit-d64-depth2-img32", rounds=1)
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["upstream", "ours"]
