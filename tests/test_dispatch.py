"""The one dispatcher: auto picks the best available, explicit requests fail loudly with the reason."""

import logging

import pytest
import torch

from l2p_fast import FusedPromptPool, _native, available_backends, dispatch, reference
from l2p_fast.ops import assemble as assemble_op
from l2p_fast.ops import pool, prepend, query_reduce

L2P_OPS = ("pool_forward", "prepend", "query_reduce", "assemble")


@pytest.fixture(autouse=True)
def _fresh_cache():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def test_reference_always_available() -> None:
    assert "reference" in available_backends("cpu")
    for op in L2P_OPS:
        assert dispatch.resolve(op, "reference", "cpu") == "reference"


def test_table_holds_every_op_of_every_backend() -> None:
    expected = {
        ("pool_forward", "reference"): reference.pool_forward,
        ("pool_forward", "cpu"): pool.native_pool_forward,
        ("pool_forward", "cuda"): pool.native_pool_forward,
        ("pool_forward", "triton"): pool.triton_pool,
        ("prepend", "reference"): reference.prepend,
        ("prepend", "cpu"): reference.prepend,
        ("prepend", "cuda"): reference.prepend,
        ("prepend", "triton"): prepend.triton_prepend_forward,
        ("query_reduce", "reference"): query_reduce.reference_query_reduce,
        ("query_reduce", "cpu"): query_reduce.query_reduce,
        ("query_reduce", "cuda"): query_reduce.query_reduce,
        ("assemble", "reference"): reference.assemble,
        ("assemble", "cpu"): assemble_op.native_assemble,
        ("assemble", "cuda"): assemble_op.native_assemble,
        ("assemble", "triton"): assemble_op.triton_assemble,
    }
    assert {key: fn for key, fn in dispatch.IMPLEMENTATIONS.items() if key[0] in L2P_OPS} == expected
    assert set(dispatch.known_ops()) >= {*L2P_OPS, "prefix_gather"}  # every op is registered on import


@pytest.mark.skipif(not _native.is_built(), reason=f"native extension missing: {_native.LOAD_ERROR}")
def test_auto_on_cpu_picks_the_native_backend() -> None:
    for op in L2P_OPS:
        assert dispatch.resolve(op, "auto", "cpu") == "cpu"
    assert dispatch.implementation("pool_forward", "auto", "cpu") is pool.native_pool_forward


def test_auto_without_native_falls_back_to_reference(monkeypatch) -> None:
    monkeypatch.setattr(_native, "is_built", lambda: False)
    assert dispatch.resolve("pool_forward", "auto", "cpu") == "reference"
    assert "cpu" not in available_backends("cpu")
    with pytest.raises(RuntimeError, match=r"backend='cpu' is not available on 'cpu'"):
        dispatch.resolve("assemble", "cpu", "cpu")


def test_auto_skips_a_backend_without_the_op(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "AUTO_PREFERENCE", {"cpu": ("triton", "reference")})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch.unavailable_reason("triton", "cpu") is not None:
        pytest.skip(f"triton unavailable: {dispatch.unavailable_reason('triton', 'cpu')}")
    assert dispatch.resolve("assemble", "auto", "cpu") == "triton"
    assert dispatch.resolve("query_reduce", "auto", "cpu") == "reference"  # no Triton query_reduce
    with pytest.raises(RuntimeError, match=r"op 'query_reduce' has no 'triton' implementation"):
        dispatch.resolve("query_reduce", "triton", "cpu")


def test_auto_on_cpu_never_picks_triton() -> None:
    assert "triton" not in dispatch.AUTO_PREFERENCE["cpu"]
    assert all(dispatch.resolve(op, "auto", "cpu") != "triton" for op in L2P_OPS)


def test_auto_logs_why_it_skips(caplog) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: nothing is skipped for lack of one")
    with caplog.at_level(logging.DEBUG, logger="l2p_fast.dispatch"):
        assert dispatch.resolve("pool_forward", "auto", "cuda") == "reference"
    assert "skips 'cuda'" in caplog.text and "skips 'triton'" in caplog.text


def test_explicit_unavailable_backend_raises_with_reason() -> None:
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available on 'cpu': backend 'cuda' runs on 'cuda' tensors"):
        dispatch.resolve("pool_forward", "cuda", "cpu")
    module = FusedPromptPool(prompt_pool=True, prompt_key=True, pool_size=3, top_k=1, embed_dim=4, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        module(torch.randn(2, 3, 4))


def test_unavailable_reasons(monkeypatch) -> None:
    assert "unknown backend 'npu'" in dispatch.unavailable_reason("npu", "cpu")
    assert dispatch.unavailable_reason("reference", "mps") is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in dispatch.unavailable_reason("triton", "cpu")
    assert "'mps'" in dispatch.unavailable_reason("triton", "mps")
    assert "runs on 'cpu' tensors" in dispatch.unavailable_reason("cpu", "cuda")
    if not torch.cuda.is_available():
        assert "no CUDA device" in dispatch.unavailable_reason("triton", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = None if dispatch.TRITON_FOUND else "the triton package is not installed (pip install triton)"
    assert dispatch.unavailable_reason("triton", "cpu") == expected


def test_environment_variable_overrides_auto(monkeypatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve("pool_forward", "auto", "cpu") == "reference"
    assert dispatch.implementation("pool_forward", "auto", "cpu") is reference.pool_forward
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert dispatch.resolve("pool_forward", "auto", "cpu") == "reference"  # read once, until clear_cache()
    dispatch.clear_cache()
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        dispatch.resolve("pool_forward", "auto", "cpu")


def test_pool_resolved_backend() -> None:
    assert FusedPromptPool(backend="reference").resolved_backend("cpu") == "reference"
    module = FusedPromptPool(prompt_pool=True, pool_size=3, top_k=1, backend="cpu")
    if _native.is_built():
        assert module.resolved_backend("cpu") == "cpu"
