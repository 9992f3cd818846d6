"""The backend table: auto picks the best available, explicit requests fail loudly with the reason."""

import logging

import pytest
import torch

from l2p_fast import FusedPromptPool, available_backends, dispatch


@pytest.fixture(autouse=True)
def _fresh_cache():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def test_reference_always_available() -> None:
    assert "reference" in available_backends("cpu")
    assert dispatch.resolve("reference", "cpu")[0] == "reference"


def test_auto_on_cpu_picks_first_available_in_table_order() -> None:
    name, _ = dispatch.resolve("auto", "cpu")
    expected = next(n for n in dispatch.AUTO_PREFERENCE["cpu"] if dispatch.unavailable_reason(n, "cpu") is None)
    assert name == expected


def test_auto_logs_why_it_skips(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="l2p_fast.dispatch"):
        dispatch.resolve("auto", "cuda")
    # no GPU here: at least the CUDA backend is skipped, with its reason
    if not torch.cuda.is_available():
        assert "skips 'cuda'" in caplog.text


def test_explicit_unavailable_backend_raises_with_reason() -> None:
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available on 'cpu': backend 'cuda' runs on 'cuda' tensors"):
        dispatch.resolve("cuda", "cpu")
    pool = FusedPromptPool(prompt_pool=True, prompt_key=True, pool_size=3, top_k=1, embed_dim=4, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        pool(torch.randn(2, 3, 4))


def test_unknown_backend_reason() -> None:
    assert "unknown backend" in dispatch.unavailable_reason("npu", "cpu")


def test_environment_variable_overrides_auto(monkeypatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve("auto", "cpu")[0] == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        dispatch.resolve("auto", "cpu")


def test_pool_resolved_backend() -> None:
    pool = FusedPromptPool(backend="reference")
    assert pool.resolved_backend("cpu") == "reference"
