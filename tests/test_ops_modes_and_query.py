"""The static tables of l2p_fast.modes and the dispatched token query (l2p_fast/ops/query_reduce.py)."""

from __future__ import annotations

import pytest
import torch

from l2p_fast import dispatch, modes


def test_query_mode_codes() -> None:
    assert [modes.query_mode(key, False) for key in ("mean", "max", "mean_max", "cls")] == [0, 1, 2, 1]
    assert modes.query_mode("cls", True) == modes.QUERY_FROM_CLS == 3
    assert modes.query_mode("mean", True) == 0  # cls_features only matter for 'cls'
    assert [modes.takes_token_max(code) for code in range(4)] == [False, True, True, False]
    assert modes.EMBEDDING_KEYS == ("mean", "max", "mean_max", "cls")
    with pytest.raises(KeyError):
        modes.query_mode("median", False)


def test_dtype_rules() -> None:
    assert modes.compute_dtype(torch.bfloat16, torch.float16) == torch.float32
    assert modes.compute_dtype(torch.float16, torch.float64) == torch.float64
    assert modes.compute_dtype(torch.float32, torch.float32) == torch.float32
    assert modes.promoted_dtype(torch.bfloat16, torch.bfloat16, None) == torch.bfloat16
    assert modes.promoted_dtype(torch.bfloat16, torch.float16, torch.bfloat16) == torch.float32
    assert modes.promoted_dtype(torch.float32, torch.float32, torch.float32, torch.float64) == torch.float64


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("embedding_key", ["mean", "max", "mean_max", "cls"])
def test_query_reduce_values_and_gradient(backend: str, embedding_key: str) -> None:
    reason = dispatch.unavailable_reason(backend, "cpu", "query_reduce")
    if reason is not None:
        pytest.skip(f"backend={backend!r} cannot reduce on cpu: {reason}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=gen, dtype=torch.bfloat16).requires_grad_(True)
    reduce = dispatch.implementation("query_reduce", backend, "cpu")
    q = reduce(x, embedding_key)
    xf = x.detach().float()
    mean, top = xf.mean(1), xf.max(1).values
    expected = {"mean": mean, "max": top, "mean_max": top + 2 * mean, "cls": top}[embedding_key]
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, expected, rtol=1e-6, atol=1e-6)
    weight = torch.randn(q.shape, generator=gen)
    (grad,) = torch.autograd.grad((q * weight).sum(), x)
    xr = xf.clone().requires_grad_(True)
    mean_r, top_r = xr.mean(1), xr.max(1).values
    ref = {"mean": mean_r, "max": top_r, "mean_max": top_r + 2 * mean_r, "cls": top_r}[embedding_key]
    (expected_grad,) = torch.autograd.grad((ref * weight).sum(), xr)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, expected_grad.to(torch.bfloat16))  # bf16 tolerance: sums rounded per path
