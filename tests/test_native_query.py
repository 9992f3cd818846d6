"""The native query reduction l2p_fast::query_reduce(x, mode) -> (q, argmax), on CPU tensors and, when a GPU
exists, on CUDA tensors (the ``device`` parameter): values against plain PyTorch, gradients, opcheck, compile.

Modes (the op's integer codes): 0 mean, 1 max, 2 max + 2·mean over the N tokens of x (B, N, D) → q (B, D) in
max(x.dtype, fp32).
"""

import pytest
import torch

from l2p_fast.testing import TOLERANCES

MODES = {"mean": 0, "max": 1, "mean_max": 2}
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.requires_backend("cpu", "cpu")),
    pytest.param("cuda", marks=pytest.mark.requires_backend("cuda", "cuda")),
]


@pytest.fixture(autouse=True)
def _needs_the_op() -> None:  # runs after the requires_backend skips
    if not hasattr(torch.ops.l2p_fast, "query_reduce"):
        pytest.skip("l2p_fast._C has no op l2p_fast::query_reduce")


def expected_query(x: torch.Tensor, embedding_key: str) -> torch.Tensor:
    """docs/behaviour.md §4.1 in plain PyTorch, in max(x.dtype, fp32)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    mean, top = x.mean(dim=1), x.amax(dim=1)
    return {"mean": mean, "max": top, "mean_max": top + 2 * mean}[embedding_key]


def query(x: torch.Tensor, embedding_key: str) -> torch.Tensor:
    return torch.ops.l2p_fast.query_reduce(x, MODES[embedding_key])[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("embedding_key", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_values(device: str, embedding_key: str, dtype: torch.dtype) -> None:
    x = torch.randn(5, 97, 123, device=device).to(dtype)
    expected = expected_query(x, embedding_key)
    got = query(x, embedding_key)
    assert got.dtype == expected.dtype and got.device == x.device
    tol = TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("embedding_key", list(MODES))
def test_gradients(device: str, embedding_key: str) -> None:
    x = torch.randn(3, 7, 9, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(3, 9, dtype=torch.float64, device=device)
    (query(x, embedding_key) * weight).sum().backward()
    got, x.grad = x.grad, None
    (expected_query(x, embedding_key) * weight).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: query(t, embedding_key), (x.detach().requires_grad_(True),))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device: str) -> None:
    x = torch.randn(4, 16, 6, device=device).transpose(1, 2)  # (4, 6, 16) view
    torch.testing.assert_close(query(x, "mean_max"), expected_query(x, "mean_max"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck(device: str, mode: int) -> None:
    x = torch.randn(3, 5, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.l2p_fast.query_reduce.default, (x, mode))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_parity(device: str) -> None:
    x = torch.randn(3, 5, 8, device=device)
    compiled = torch.compile(lambda t: query(t, "mean_max") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), query(x, "mean_max") * 2)


@pytest.mark.requires_backend("cpu", "cpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_sums_tokens_in_order_and_the_first_nan_wins(dtype: torch.dtype) -> None:
    """CPU kernel, per column: Σ over the tokens in order (bitwise), the max and argmax as torch.max (the
    first NaN wins, else the first maximum); D = 37 leaves a tail after any vector width."""
    x = torch.randn(3, 11, 37).to(dtype)
    x[0, 4, 3] = x[0, 7, 3] = float("nan")
    x[1, :, 5] = 1.0  # a tie over every token: argmax 0
    x[2, 2, 36] = float("inf")
    acc = torch.promote_types(dtype, torch.float32)
    total = torch.zeros(3, 37, dtype=acc)
    for n in range(x.shape[1]):
        total += x[:, n].to(acc)
    mean = total / x.shape[1]
    top, where = x.to(acc).max(dim=1)
    for mode, expected in ((0, mean), (1, top), (2, top + 2 * mean)):
        q, argmax = torch.ops.l2p_fast.query_reduce(x, mode)
        assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8)), mode  # bitwise, NaN included
        if mode:
            assert torch.equal(argmax, where), mode
    assert torch.ops.l2p_fast.query_reduce(x, 1)[1][0, 3] == 4
