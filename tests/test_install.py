"""The package imports and works without its native extension; setup.py explains a missing torch."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_without_extension_falls_back_to_reference() -> None:
    code = (
        "import logging, sys\n"
        "sys.modules['l2p_fast._C'] = None  # as if the extension was never built\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(name)s %(message)s')\n"
        "import torch\n"
        "from l2p_fast import FusedPromptPool, available_backends, _native\n"
        "assert not _native.is_built() and 'not built' in _native.LOAD_ERROR\n"
        "assert 'cpu' not in available_backends('cpu')\n"
        "pool = FusedPromptPool(prompt_pool=True, prompt_key=True, pool_size=4, top_k=2, embed_dim=8)\n"
        "out = pool(torch.randn(3, 5, 8))\n"
        "assert out['prompted_embedding'].shape == (3, 15, 8)\n"
        "print('resolved', pool.resolved_backend('cpu'))\n"
        "try:\n"
        "    FusedPromptPool(backend='cpu')(torch.randn(2, 3, 768))\n"
        "except RuntimeError as error:\n"
        "    print('explicit:', error)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "resolved reference" in result.stdout
    assert "explicit: backend='cpu' is not available on 'cpu': l2p_fast._C is not built" in result.stdout
    # auto said why it skipped the native backend, at debug level
    assert "backend 'auto' on cpu skips 'cpu': l2p_fast._C is not built" in result.stderr


def test_setup_without_torch_gives_one_clear_message() -> None:
    code = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None  # as if torch was not installed\n"
        "sys.argv = ['setup.py', '--name']\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
    )
    result = _run(code)
    assert result.returncode != 0
    assert "needs PyTorch installed first" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr
