"""The CUDA kernels of the built extension (``l2p_fast/_C*.so``): no kernel may use stack (a register spill or a
local array in slow local memory), read with Triton's bundled cuobjdump; skipped when the extension has no CUDA code."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2p_fast import _native

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "triton_resources.py"
pytest.importorskip("triton", reason="triton is not installed (its bundled cuobjdump reads the cubins)")
pytestmark = pytest.mark.skipif(not _native.is_built(), reason=f"native extension missing: {_native.LOAD_ERROR}")


def test_no_cuda_kernel_uses_stack() -> None:
    library = _native._C.__file__
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--cuda-extension", library], env=env, capture_output=True,
                         text=True, timeout=300)
    rows = [line for line in run.stdout.splitlines() if line.startswith("| `")]
    if not rows:
        pytest.skip("the extension was built without CUDA kernels (no nvcc or L2P_FAST_NO_CUDA=1)")
    assert any("score_kernel" in row for row in rows) and any("assemble_kernel" in row for row in rows), run.stdout
    with_stack = [row for row in rows if row.split("|")[-3].strip() != "0"]
    assert not with_stack, "CUDA kernels with stack (spills or local arrays):\n" + "\n".join(with_stack)
    assert run.returncode == 0, run.stderr
