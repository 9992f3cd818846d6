"""``prefix_gather`` on every CPU backend against its reference: values bit-exact, gradients (deterministic,
duplicate ids summed), opcheck of the custom ops, fp64 gradcheck, torch.compile parity, clear errors."""

import pytest
import torch

from l2p_fast.ops.prefix_gather import native_prefix_gather, prefix_gather, prefix_gather_backward
from l2p_fast.ops.prefix_gather_triton import prefix_gather_backward_triton, prefix_gather_triton

BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.requires_backend("cpu")),
    pytest.param("triton", marks=pytest.mark.requires_backend("triton")),
]
SHAPES = [(3, 2, 6, 10, 5, 2), (1, 1, 1, 3, 1, 1), (2, 2, 4, 37, 3, 4)]  # L, C, M, R, B, K


def _case(shape, dtype=torch.float32, seed=0, duplicates=True):
    layers, dual, pool, row, batch, k = shape
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(layers, dual, pool, row, generator=g, dtype=dtype)
    idx = torch.randint(0, pool, (batch, k), generator=g)
    if duplicates and batch > 1:
        idx[1] = idx[0]  # the batch vote / task mask: rows share ids
    return prompt, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_reference(backend: str, shape: tuple, batch_first: bool, dtype: torch.dtype) -> None:
    prompt, idx = _case(shape, dtype)
    prompt.requires_grad_(True)
    out = prefix_gather(prompt, idx, batch_first, backend=backend)
    want = prefix_gather(prompt, idx, batch_first, backend="reference")
    assert torch.equal(out, want) and out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    (got,) = torch.autograd.grad(out, prompt, grad)
    # against the exact per-id sum in fp64: the reference and cpu sum duplicates in the tensor's dtype (up to
    # B·K = 12 terms here: a few bf16 ulps of |sum| ~ 4), Triton in fp32 (or fp64) before one rounding
    expected = torch.zeros(prompt.shape, dtype=torch.float64)
    layers, dual, pool, row = prompt.shape
    g64 = grad.double() if batch_first else grad.double().transpose(1, 2)
    for b in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            expected[:, :, idx[b, j]] += g64[:, b, :, j]
    rtol, atol = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 8e-2)}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)
    assert got.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_deterministic(backend: str) -> None:
    prompt, idx = _case((2, 2, 3, 64, 9, 3), seed=1)
    idx[:] = idx[0]  # every row the same ids: many duplicates to sum
    prompt.requires_grad_(True)
    grad = torch.randn(prefix_gather(prompt, idx, backend=backend).shape)
    runs = [torch.autograd.grad(prefix_gather(prompt, idx, backend=backend), prompt, grad)[0] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("batch_first", [True, False])
def test_opcheck(batch_first: bool) -> None:
    prompt, idx = _case(SHAPES[0])
    prompt.requires_grad_(True)
    torch.library.opcheck(native_prefix_gather, (prompt, idx, batch_first))
    grad = torch.randn(native_prefix_gather(prompt, idx, batch_first).shape, requires_grad=True)
    torch.library.opcheck(prefix_gather_backward, (grad, idx, prompt.shape[2], batch_first))


@pytest.mark.requires_backend("triton")
def test_opcheck_triton() -> None:
    prompt, idx = _case(SHAPES[1])
    prompt.requires_grad_(True)
    torch.library.opcheck(prefix_gather_triton, (prompt, idx, True))
    grad = torch.randn(prefix_gather_triton(prompt, idx, False).shape)
    torch.library.opcheck(prefix_gather_backward_triton, (grad, idx, prompt.shape[2], False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend: str) -> None:
    prompt, idx = _case((2, 2, 3, 4, 3, 2), dtype=torch.float64, seed=2)
    prompt.requires_grad_(True)
    fast = backend == "triton"  # the interpreter pays per launch: a random-projection check (few launches)
    for batch_first in (True, False):
        check = lambda p, bf=batch_first: prefix_gather(p, idx, bf, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(check, (prompt,), fast_mode=fast)
    if backend != "triton":  # the Triton backward is differentiable once
        assert torch.autograd.gradgradcheck(lambda p: prefix_gather(p, idx, backend=backend), (prompt,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_parity(backend: str) -> None:
    prompt, idx = _case(SHAPES[0], seed=3)
    prompt.requires_grad_(True)
    compiled = torch.compile(lambda p, i: prefix_gather(p, i, backend=backend), fullgraph=True, backend="aot_eager")
    out = compiled(prompt, idx)
    want = prefix_gather(prompt, idx, backend=backend)
    assert torch.equal(out, want)
    grad = torch.randn(out.shape)
    assert torch.equal(torch.autograd.grad(out, prompt, grad)[0], torch.autograd.grad(want, prompt, grad)[0])


def test_bad_inputs_named() -> None:
    prompt, idx = _case(SHAPES[0])
    with pytest.raises(ValueError, match="prompt"):
        prefix_gather(prompt[0], idx)
    with pytest.raises(TypeError, match="idx"):
        prefix_gather(prompt, idx.int())
    with pytest.raises(ValueError, match="idx"):
        prefix_gather(prompt, idx[0])


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.requires_backend(b)) for b in ("cpu", "triton")])
@pytest.mark.parametrize("batch_first", [True, False])
def test_backward_sums_in_sample_order(backend: str, batch_first: bool) -> None:
    """The fused backwards add the rows of each id in (b, j) order: bit-equal to that sequential fp32 sum."""
    prompt, idx = _case((2, 2, 3, 50, 7, 2), seed=4)
    idx[:, 0] = 1  # seven rows share id 1
    prompt.requires_grad_(True)
    out = prefix_gather(prompt, idx, batch_first, backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    (got,) = torch.autograd.grad(out, prompt, grad)
    g = grad if batch_first else grad.transpose(1, 2)  # (L, B, C, K, R)
    expected = torch.zeros_like(prompt)
    for b in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            expected[:, :, idx[b, j]] += g[:, b, :, j]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_non_contiguous_ids(backend: str, batch_first: bool) -> None:
    """idx as a transposed (non-contiguous) view: the same prompts and gradient as from its contiguous copy."""
    prompt, idx = _case((2, 2, 5, 7, 4, 3), seed=5)
    idx = idx.t().contiguous().t()  # (B, K) with column-major strides
    assert not idx.is_contiguous()
    prompt.requires_grad_(True)
    out = prefix_gather(prompt, idx, batch_first, backend=backend)
    want = prefix_gather(prompt, idx.contiguous(), batch_first, backend="reference")
    assert torch.equal(out, want)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(torch.autograd.grad(out, prompt, grad)[0], torch.autograd.grad(want, prompt, grad)[0])
