"""The native pool ops as torch.library ops: opcheck, fp64 gradcheck, torch.compile parity of the
module, determinism of the backward, independence of the thread count."""

import pytest
import torch

from l2p_fast import _native, ops
from l2p_fast.testing import PoolCase, clone_pool, forward_and_grads, make_inputs, make_pool

pytestmark = pytest.mark.skipif(
    not (_native.is_built() and hasattr(torch.ops.l2p_fast, "pool_forward")),
    reason=f"native op l2p_fast::pool_forward missing: {_native.LOAD_ERROR}",
)


def _op_args(mode: int, masked: bool, batchwise: bool, dtype=torch.float32, requires_grad=True):
    gen = torch.Generator().manual_seed(mode * 4 + masked * 2 + batchwise)
    x = torch.randn(3, 5, 8, generator=gen, dtype=dtype)
    cls = torch.randn(3, 8, generator=gen, dtype=dtype) if mode == ops.POOL_MODE_CLS else None
    prompt = torch.randn(6, 2, 8, generator=gen, dtype=dtype)
    keys = torch.randn(6, 8, generator=gen, dtype=dtype)
    mask = torch.randint(0, 6, (3, 2), generator=gen) if masked else None
    for t in (x, cls, prompt, keys):
        if t is not None:
            t.requires_grad_(requires_grad)
    return (x, cls, prompt, keys, mask, mode, 3, batchwise)


@pytest.mark.parametrize(("mode", "masked", "batchwise"),
                         [(0, False, False), (1, False, True), (2, True, False), (3, False, True)])
def test_opcheck_forward(mode: int, masked: bool, batchwise: bool) -> None:
    torch.library.opcheck(torch.ops.l2p_fast.pool_forward.default, _op_args(mode, masked, batchwise))


@pytest.mark.parametrize("mode", [0, 2, 3])
def test_opcheck_backward(mode: int) -> None:
    args = _op_args(mode, False, False, requires_grad=False)
    out = torch.ops.l2p_fast.pool_forward(*args)
    prompted, x_norm, prompt_norm, sim, idx, selected, reduce, argmax, q_sumsq, k_sumsq = out
    grads = [torch.randn_like(t) for t in (prompted, x_norm, prompt_norm, sim, selected, reduce)]
    cls_dtype = torch.float32
    backward_args = (*grads, x_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax, mode, 2, torch.float32, cls_dtype,
                     torch.float32, torch.float32, True, mode == 3, True, True)
    torch.library.opcheck(torch.ops.l2p_fast.pool_backward.default, backward_args)
    grad_x, grad_cls, grad_prompt, grad_keys = torch.ops.l2p_fast.pool_backward(*backward_args)
    assert grad_x.shape == (3, 5, 8) and grad_prompt.shape == (6, 2, 8) and grad_keys.shape == (6, 8)
    assert grad_cls.shape == ((3, 8) if mode == 3 else (0,))


@pytest.mark.parametrize("mode", [0, 1, 3])
def test_backward_missing_small_grads_are_zeros(mode: int) -> None:
    """None for the gradients of x_embed_norm, prompt_norm, similarity and selected_key (outputs the loss does not
    use; the C++ autograd passes None) gives the gradients of explicit zeros, and passes opcheck."""
    args = _op_args(mode, False, True, requires_grad=False)
    out = torch.ops.l2p_fast.pool_forward(*args)
    prompted, x_norm, prompt_norm, sim, idx, selected, reduce, argmax, q_sumsq, k_sumsq = out
    gen = torch.Generator().manual_seed(mode)
    grad_prompted, grad_reduce = torch.randn(prompted.shape, generator=gen), torch.randn((), generator=gen)
    tail = (x_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax, mode, 2, torch.float32, torch.float32, torch.float32,
            torch.float32, True, mode == 3, True, True)
    zeros = [torch.zeros_like(t) for t in (x_norm, prompt_norm, sim, selected)]
    missing = (grad_prompted, None, None, None, None, grad_reduce, *tail)
    torch.library.opcheck(torch.ops.l2p_fast.pool_backward.default, missing)
    with_none = torch.ops.l2p_fast.pool_backward(*missing)
    with_zeros = torch.ops.l2p_fast.pool_backward(grad_prompted, *zeros, grad_reduce, *tail)
    grad_x, grad_cls, grad_prompt, grad_keys = with_none
    torch.testing.assert_close(grad_prompt, with_zeros[2], rtol=0, atol=0)  # does not read the small grads
    # the skipped "+ 0" terms may let the compiler fuse a multiply-add differently: equal up to rounding
    for got, expected in ((grad_x, with_zeros[0]), (grad_cls, with_zeros[1]), (grad_keys, with_zeros[3])):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert grad_keys.abs().sum() > 0  # the pull term reaches the keys


def test_backward_rejects_a_misshapen_optional_grad() -> None:
    args = _op_args(3, False, True, requires_grad=False)
    out = torch.ops.l2p_fast.pool_forward(*args)
    prompted, x_norm, prompt_norm, sim, idx, argmax, q_sumsq, k_sumsq = *out[:4], out[4], *out[7:]
    tail = (x_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax, 3, 2, torch.float32, torch.float32, torch.float32,
            torch.float32, False, True, True, True)
    bad_similarity = torch.zeros(sim.shape[0], sim.shape[1] + 1)  # (B, M + 1) instead of (B, M)
    with pytest.raises(RuntimeError, match="gradient shapes do not match the forward outputs"):
        torch.ops.l2p_fast.pool_backward(torch.zeros_like(prompted), None, None, bad_similarity, None,
                                         torch.ones(()), *tail)


@pytest.mark.parametrize(("mode", "masked", "batchwise"),
                         [(0, False, False), (1, False, True), (2, True, False), (3, False, True)])
def test_gradcheck_fp64(mode: int, masked: bool, batchwise: bool) -> None:
    x, cls, prompt, keys, mask, _, top_k, _ = _op_args(mode, masked, batchwise, dtype=torch.float64)
    key = {0: "mean", 1: "max", 2: "mean_max", 3: "cls"}[mode]

    def fn(x, prompt, keys, *cls_opt):
        out = ops.pool_forward(x, prompt, keys, embedding_key=key, top_k=top_k, batchwise=batchwise,
                               cls_features=cls_opt[0] if cls_opt else None, prompt_mask=mask)
        return tuple(v for v in out.values() if v.is_floating_point())

    inputs = (x, prompt, keys) + ((cls,) if cls is not None else ())
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("case", [
    PoolCase(batch=4, tokens=7, width=16, pool_size=6, top_k=3, embedding_key="cls", use_cls=True, batchwise=True),
    PoolCase(batch=3, tokens=5, width=8, pool_size=5, top_k=2, embedding_key="mean_max", learnable_key=False),
], ids=["cls-vote", "mean_max-keys-from-prompts"])
def test_compile_fullgraph_parity(case: PoolCase) -> None:
    torch._dynamo.reset()
    pool = make_pool(case, backend="cpu", seed=0)
    inputs = make_inputs(case, seed=1)
    eager_out, eager_grads, weights = forward_and_grads(pool, inputs)
    twin = clone_pool(pool, "cpu")
    twin.forward = torch.compile(twin.forward, fullgraph=True)
    compiled_out, compiled_grads, _ = forward_and_grads(twin, inputs, weights)
    for key, value in eager_out.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(compiled_out[key], value, rtol=0, atol=0, msg=key)
        else:
            assert compiled_out[key] == value
    for key, value in eager_grads.items():
        if value is None:
            assert compiled_grads[key] is None, key
        else:
            torch.testing.assert_close(compiled_grads[key], value, rtol=1e-6, atol=1e-6, msg=key)


def _run_twice(case: PoolCase) -> tuple:
    pool = make_pool(case, backend="cpu", seed=5)
    inputs = make_inputs(case, seed=6)
    first = forward_and_grads(pool, inputs)
    second = forward_and_grads(pool, inputs, first[2])
    return first, second


def _assert_bit_identical(a: tuple, b: tuple) -> None:
    for key, value in a[0].items():
        assert (value == b[0][key]) if isinstance(value, int) else torch.equal(value, b[0][key]), key
    for key, value in a[1].items():
        assert (value is None and b[1][key] is None) or torch.equal(value, b[1][key]), key


def test_backward_is_deterministic() -> None:
    case = PoolCase(batch=13, tokens=9, width=33, pool_size=5, top_k=3, embedding_key="mean_max", batchwise=True)
    first, second = _run_twice(case)
    _assert_bit_identical(first, second)


@pytest.mark.parametrize("embedding_key", ["mean", "cls"])
def test_thread_count_does_not_change_results(embedding_key: str) -> None:
    # large enough that every parallel loop of the CPU kernels splits over 2 threads
    # (every loop has more rows than its grain of ~256K elements per task, csrc/cpu/pool.cpp grain_for)
    case = PoolCase(batch=40, tokens=37, width=2100, pool_size=130, top_k=4, length=2, embedding_key=embedding_key,
                    use_cls=True, batchwise=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run_twice(case)[0]
        torch.set_num_threads(2)
        double = _run_twice(case)[0]
    finally:
        torch.set_num_threads(threads)
    _assert_bit_identical(single, double)


@pytest.mark.parametrize("loss_kind", ["nonlinear", "pull_term_only"])
def test_second_order_gradient_raises_a_clear_error(loss_kind: str) -> None:
    """create_graph=True: the first-order gradients are the plain backward's; differentiating them again through
    the native pool raises an error naming the reference backend (never a silently missing term)."""
    case = PoolCase(batch=3, tokens=5, width=8, pool_size=4, top_k=2, embedding_key="cls", use_cls=True)
    pool = clone_pool(make_pool(case, seed=3), "cpu")
    inputs = make_inputs(case, seed=3)
    x = inputs["x_embed"].requires_grad_(True)
    params = [pool.prompt, pool.prompt_key, x]

    def loss_of(out: dict) -> torch.Tensor:
        if loss_kind == "pull_term_only":  # linear in the outputs: the incoming gradient is a constant
            return -out["reduce_sim"]
        return (out["prompted_embedding"] ** 2).sum() - out["reduce_sim"]

    plain = torch.autograd.grad(loss_of(pool(x, cls_features=inputs["cls_features"])), params, allow_unused=True)
    first = torch.autograd.grad(loss_of(pool(x, cls_features=inputs["cls_features"])), params, create_graph=True,
                                allow_unused=True)  # fmt: skip
    for got, expected in zip(first, plain, strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            assert torch.equal(got.detach(), expected)
    penalty = sum((g**2).sum() for g in first if g is not None and g.requires_grad)
    with pytest.raises(RuntimeError, match=r"differentiable once.*backend='reference'"):
        torch.autograd.grad(penalty, [pool.prompt, pool.prompt_key])
