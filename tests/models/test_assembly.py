"""The one-pass assembly op on every available backend vs the reference (concat, concat, add).

Values are copies (+ one add) and are compared bit-exactly; gradients of x are slices (exact); the
prompt, CLS and positional gradients are sums, compared with the dtype's tolerance. Triton runs on
CPU tensors through its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""

import pytest
import torch

from l2p_fast import dispatch
from l2p_fast.ops.assemble import assemble
from l2p_fast.reference import assemble_reference

BACKENDS = ["cpu", "triton"]
CASES = [  # (B, N, D, M, Lp, K)
    (3, 7, 16, 5, 2, 3),
    (1, 97, 123, 1, 1, 1),  # B = 1, K = M = 1, odd sizes
    (4, 0, 8, 4, 3, 4),  # no tokens (text of only [CLS]), K = M
    (2, 10, 33, 6, 5, 2),
]


def require(backend: str, device_type: str = "cpu") -> None:
    reason = dispatch.unavailable_reason(backend, device_type, "assemble")
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot assemble on {device_type}: {reason}")


def inputs(case, dtype=torch.float32, *, batch_cls=False, with_pos=True, strided=True, seed=0):
    batch, tokens, width, pool, length, top_k = case
    gen = torch.Generator().manual_seed(seed)
    if strided:  # timm's patch embedding hands over a transposed (B, N, D) view
        x = torch.randn(batch, width, tokens, generator=gen).transpose(1, 2)
    else:
        x = torch.randn(batch, tokens, width, generator=gen)
    prompt = torch.randn(pool, length, width, generator=gen)
    idx = torch.randint(0, pool, (batch, top_k), generator=gen)
    idx[0, -1] = idx[0, 0]  # a duplicate id within a row
    cls = torch.randn(batch if batch_cls else 1, 1, width, generator=gen)
    seq = 1 + top_k * length + tokens
    pos = torch.randn(1, seq, width, generator=gen) if with_pos else None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(x), cast(prompt), idx, cast(cls), cast(pos)


def run(backend: str, args):
    return assemble(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["pos", "no_pos_batch_cls", "contiguous"])
def test_forward_bit_exact(backend: str, case, variant: str) -> None:
    require(backend)
    args = inputs(
        case,
        batch_cls=variant == "no_pos_batch_cls",
        with_pos=variant != "no_pos_batch_cls",
        strided=variant != "contiguous",
    )
    got = run(backend, args)
    expected = assemble_reference(*args)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
    ],
)
def test_dtypes_bit_exact(backend: str, dtypes) -> None:
    require(backend)
    x_dtype, param_dtype = dtypes
    x, prompt, idx, cls, pos = inputs(CASES[0], param_dtype)
    args = (x.to(x_dtype), prompt, idx, cls, pos)
    got = run(backend, args)
    expected = assemble_reference(*args)
    assert got.dtype == expected.dtype == torch.promote_types(x_dtype, param_dtype)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_cls", [False, True])
def test_gradients_match_reference(backend: str, case, batch_cls: bool) -> None:
    require(backend)
    base = inputs(case, torch.float64, batch_cls=batch_cls)
    weight = torch.randn(assemble_reference(*base).shape, dtype=torch.float64)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in base]
        (fn(*leaves) * weight).sum().backward()
        return [t.grad for t in leaves if t.is_floating_point()]

    got = grads(lambda *a: run(backend, a))
    expected = grads(assemble_reference)
    names = ["x", "prompt", "cls", "pos"]
    for name, g, e in zip(names, got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.equal(got[0], expected[0])  # the token slice is a copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_deterministic_and_only_needed_grads(backend: str) -> None:
    require(backend)
    x, prompt, idx, cls, pos = inputs((16, 9, 64, 3, 4, 3), seed=3)
    prompt.requires_grad_(True)
    results = []
    for _ in range(2):
        prompt.grad = None
        out = run(backend, (x, prompt, idx, cls, pos))
        out.backward(torch.ones_like(out) * torch.arange(out.shape[1]).view(1, -1, 1))
        results.append(prompt.grad.clone())
    assert torch.equal(results[0], results[1])
    assert x.grad is None and cls.grad is None and pos.grad is None


def leaf_inputs(case, dtype=torch.float32) -> tuple:
    """inputs(case) with every float tensor a fresh leaf that requires grad (idx and a missing pos as they are)."""
    return tuple(t.clone().requires_grad_(True) if t is not None and t.is_floating_point() else t
                 for t in inputs(case, dtype, strided=False))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend: str) -> None:
    require(backend)
    args = leaf_inputs((2, 3, 4, 3, 2, 2), torch.float64)
    assert torch.autograd.gradcheck(lambda *a: run(backend, a), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend: str) -> None:
    """Second-order gradients (the prompt-gradient op has its own autograd), against finite differences."""
    require(backend)
    args = leaf_inputs((2, 3, 4, 3, 2, 2), torch.float64)
    assert torch.autograd.gradgradcheck(lambda *a: run(backend, a) ** 2, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_gradient_matches_reference(backend: str) -> None:
    require(backend)
    got_args, ref_args = leaf_inputs(CASES[0]), leaf_inputs(CASES[0])

    def hessian_term(out, args):
        x, prompt, _idx, cls, pos = args
        grads = torch.autograd.grad((out**2).sum(), [x, prompt, cls, pos], create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        return torch.autograd.grad(penalty, [x, prompt, cls, pos])

    got = hessian_term(run(backend, got_args), got_args)
    expected = hessian_term(assemble_reference(*ref_args), ref_args)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def _op(backend: str):
    return torch.ops.l2p_fast.assemble.default if backend == "cpu" else torch.ops.l2p_fast.assemble_triton.default


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_pos", [True, False])
def test_opcheck(backend: str, with_pos: bool) -> None:
    require(backend)
    x, prompt, idx, cls, pos = inputs(CASES[0], with_pos=with_pos, strided=False)
    args = (
        x.requires_grad_(True),
        prompt.requires_grad_(True),
        idx,
        cls.requires_grad_(True),
        None if pos is None else pos.requires_grad_(True),
    )
    torch.library.opcheck(_op(backend), args)
    grad_op = (
        torch.ops.l2p_fast.assemble_prompt_grad.default
        if backend == "cpu"
        else torch.ops.l2p_fast.assemble_prompt_grad_triton.default
    )
    torch.library.opcheck(grad_op, (torch.randn(3, 1 + 6 + 7, 16), idx, 5, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_parity(backend: str) -> None:
    require(backend)
    torch._dynamo.reset()
    args = inputs(CASES[0], strided=False)

    def step(x, prompt, idx, cls, pos):
        seq = assemble(x, prompt, idx, cls, pos, backend=backend)
        return seq, (seq * 2).sum(dim=1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    (seq, total), (expected_seq, expected_total) = compiled(*args), step(*args)
    assert torch.equal(seq, expected_seq)
    torch.testing.assert_close(total, expected_total)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("bad", [-1, 5, 1 << 40])
def test_out_of_range_ids_raise_in_eager_mode(backend: str, bad: int) -> None:
    require(backend)
    x, prompt, idx, cls, pos = inputs(CASES[0], strided=False)
    idx.fill_(2)
    idx[1, 0] = bad
    with pytest.raises(ValueError, match=rf"idx: expected ids in \[0, M=5\), got values in \[{min(bad, 2)}, {max(bad, 2)}\]"):
        run(backend, (x, prompt, idx, cls, pos))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_under_compile_are_clamped_as_the_reference(backend: str) -> None:
    """Where the eager value check is skipped (torch.compile) every backend clamps ids to [0, M − 1]."""
    require(backend)
    torch._dynamo.reset()
    x, prompt, idx, cls, pos = leaf_inputs(CASES[0])
    idx = idx.clone()
    idx[0, 0], idx[1, 1], idx[2, 2] = -1, 5, 1 << 40

    def step(backend_name, x, prompt, idx, cls, pos):
        return assemble(x, prompt, idx, cls, pos, backend=backend_name)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(backend, x, prompt, idx, cls, pos)
    expected = assemble_reference(x, prompt, idx.clamp(0, 4), cls, pos)
    assert torch.equal(got, expected)
    weight = torch.randn_like(got)
    grads = torch.autograd.grad((got * weight).sum(), prompt)[0]
    expected_grads = torch.autograd.grad((expected * weight).sum(), prompt)[0]
    torch.testing.assert_close(grads, expected_grads)
    reference_compiled = compiled("reference", x, prompt, idx, cls, pos)
    assert torch.equal(reference_compiled, expected)


def test_validation_errors_name_the_argument() -> None:
    x, prompt, idx, cls, pos = inputs(CASES[0])
    with pytest.raises(ValueError, match="prompt: expected"):
        assemble(x, prompt[:, :, :4], idx, cls, pos)
    with pytest.raises(TypeError, match="idx: expected an int64"):
        assemble(x, prompt, idx.int(), cls, pos)
    with pytest.raises(ValueError, match="idx: expected"):
        assemble(x, prompt, idx[:2], cls, pos)
    with pytest.raises(ValueError, match="cls: expected"):
        assemble(x, prompt, idx, cls.expand(2, 1, 16), pos)
    with pytest.raises(ValueError, match="pos: expected"):
        assemble(x, prompt, idx, cls, pos[:, :-1])
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        assemble(x.long(), prompt, idx, cls, pos)


def test_explicit_backend_that_cannot_run_raises(monkeypatch) -> None:
    dispatch.clear_cache()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        with pytest.raises(RuntimeError, match="backend='triton' is not available on 'cpu'.*TRITON_INTERPRET"):
            assemble(*inputs(CASES[0]), backend="triton")
        with pytest.raises(RuntimeError, match="unknown backend 'bogus'"):
            assemble(*inputs(CASES[0]), backend="bogus")
    finally:
        dispatch.clear_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_reference(backend: str) -> None:
    require("cuda" if backend == "cpu" else backend, "cuda")
    backend = "cuda" if backend == "cpu" else backend
    base = [None if t is None else t.cuda() for t in inputs(CASES[0], torch.float64)]
    assert torch.equal(assemble(*base, backend=backend), assemble_reference(*base))
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in base]
    assemble(*leaves, backend=backend).square().sum().backward()
    ref_leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in base]
    assemble_reference(*ref_leaves).square().sum().backward()
    for got, expected in zip(leaves, ref_leaves, strict=True):
        if got.is_floating_point():
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-12, atol=1e-12)
