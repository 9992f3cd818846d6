"""The native query-reduction op l2p_fast::query_reduce against the reference."""

import pytest
import torch

from l2p_fast import _native, ops
from l2p_fast import reference as ref

pytestmark = pytest.mark.skipif(not _native.is_built(), reason=f"native extension missing: {_native.LOAD_ERROR}")


@pytest.mark.parametrize("embedding_key", ["mean", "max", "mean_max"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_values_match_reference(embedding_key: str, dtype: torch.dtype) -> None:
    x = torch.randn(5, 97, 123).to(dtype)
    expected = ref.query(x, embedding_key, None, ref.compute_dtype(dtype, torch.float32))
    got = ops.query_reduce(x, embedding_key)
    assert got.dtype == expected.dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("embedding_key", ["mean", "max", "mean_max"])
def test_gradients_match_reference(embedding_key: str) -> None:
    x = torch.randn(3, 7, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 9, dtype=torch.float64)
    (ops.query_reduce(x, embedding_key) * weight).sum().backward()
    got, x.grad = x.grad, None
    (ref.query(x, embedding_key, None, torch.float64) * weight).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: ops.query_reduce(t, embedding_key), (x.detach().requires_grad_(True),))


def test_non_contiguous_input() -> None:
    x = torch.randn(4, 16, 6).transpose(1, 2)  # (4, 6, 16) view
    torch.testing.assert_close(ops.query_reduce(x, "mean_max"), ref.query(x, "mean_max", None, torch.float32))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck(mode: int) -> None:
    x = torch.randn(3, 5, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.l2p_fast.query_reduce.default, (x, mode))


def test_compile_fullgraph_parity() -> None:
    x = torch.randn(3, 5, 8)
    compiled = torch.compile(lambda t: ops.query_reduce(t, "mean_max") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), ops.query_reduce(x, "mean_max") * 2)
