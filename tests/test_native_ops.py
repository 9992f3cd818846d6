"""What only the native ops l2p_fast::pool_forward / pool_backward do: the backward op with missing (None)
gradients, its errors, the forward op's argument errors, results independent of the thread count, and the
clear error of a second-order gradient. (Values, gradients, opcheck, gradcheck, compile parity and
determinism of every backend: tests/test_backend_parity.py and tests/test_backend_ops.py.)"""

import pytest
import torch

from l2p_fast.testing import PoolCase, clone_pool, forward_and_grads, make_inputs, make_pool

CLS_MODE = 3  # the native ops' query-mode code of embedding_key='cls' (0 mean, 1 max, 2 mean_max)


@pytest.fixture
def device(native_backend_device: tuple[str, str]) -> str:
    """'cpu' or 'cuda': the device whose kernels of the native ops run."""
    return native_backend_device[1]


def _op_args(mode: int, masked: bool, batchwise: bool, dtype=torch.float32, requires_grad=True, device="cpu"):
    gen = torch.Generator().manual_seed(mode * 4 + masked * 2 + batchwise)
    x = torch.randn(3, 5, 8, generator=gen, dtype=dtype)
    cls = torch.randn(3, 8, generator=gen, dtype=dtype) if mode == CLS_MODE else None
    prompt = torch.randn(6, 2, 8, generator=gen, dtype=dtype)
    keys = torch.randn(6, 8, generator=gen, dtype=dtype)
    mask = torch.randint(0, 6, (3, 2), generator=gen) if masked else None
    x, cls, prompt, keys, mask = (None if t is None else t.to(device) for t in (x, cls, prompt, keys, mask))
    for t in (x, cls, prompt, keys):
        if t is not None:
            t.requires_grad_(requires_grad)
    return (x, cls, prompt, keys, mask, mode, 3, batchwise)


@pytest.mark.parametrize("mode", [0, 1, 3])
def test_backward_missing_small_grads_are_zeros(device: str, mode: int) -> None:
    """None for the gradients of x_embed_norm, prompt_norm, similarity and selected_key (outputs the loss does not
    use; the C++ autograd passes None) gives the gradients of explicit zeros, and passes opcheck."""
    args = _op_args(mode, False, True, requires_grad=False, device=device)
    out = torch.ops.l2p_fast.pool_forward(*args)
    prompted, x_norm, prompt_norm, sim, idx, selected, reduce, argmax, q_sumsq, k_sumsq = out
    gen = torch.Generator().manual_seed(mode)
    grad_prompted = torch.randn(prompted.shape, generator=gen).to(device)
    grad_reduce = torch.randn((), generator=gen).to(device)
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


def test_backward_rejects_a_misshapen_optional_grad(device: str) -> None:
    args = _op_args(3, False, True, requires_grad=False, device=device)
    out = torch.ops.l2p_fast.pool_forward(*args)
    prompted, x_norm, prompt_norm, sim, idx, argmax, q_sumsq, k_sumsq = *out[:4], out[4], *out[7:]
    tail = (x_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax, 3, 2, torch.float32, torch.float32, torch.float32,
            torch.float32, False, True, True, True)
    bad_similarity = torch.zeros(sim.shape[0], sim.shape[1] + 1, device=device)  # (B, M + 1) instead of (B, M)
    with pytest.raises(RuntimeError, match="gradient shapes do not match the forward outputs"):
        torch.ops.l2p_fast.pool_backward(torch.zeros_like(prompted), None, None, bad_similarity, None,
                                         torch.ones((), device=device), *tail)


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


@pytest.mark.parametrize("embedding_key", ["mean", "cls"])
@pytest.mark.requires_backend("cpu")
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
def test_second_order_gradient_raises_a_clear_error(device: str, loss_kind: str) -> None:
    """create_graph=True: the first-order gradients are the plain backward's; differentiating them again through
    the native pool raises an error naming the reference backend (never a silently missing term)."""
    case = PoolCase(batch=3, tokens=5, width=8, pool_size=4, top_k=2, embedding_key="cls", use_cls=True)
    pool = clone_pool(make_pool(case, device=device, seed=3), device)
    inputs = make_inputs(case, device=device, seed=3)
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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": 4}, "mode must be in"),
        ({"mode": 3}, "cls_features must be given exactly when mode == 3"),
        ({"top_k": 7}, r"top_k must be in \[1, M = 6\]"),
        ({"prompt_mask": torch.zeros(2, 1)}, "prompt_mask must be an integer"),
        ({"keys": torch.randn(5, 8)}, r"keys must be a float \(M, D\) = \(6, 8\)"),
    ],
)
def test_op_rejects_bad_arguments(device: str, kwargs: dict, message: str) -> None:
    args = {"x_embed": torch.randn(2, 3, 8), "cls_features": None, "prompt": torch.randn(6, 2, 8),
            "keys": torch.randn(6, 8), "prompt_mask": None, "mode": 0, "top_k": 2, "batchwise": False}
    args.update(kwargs)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.l2p_fast.pool_forward(*args.values())


def test_op_clamps_out_of_range_mask_ids(device: str) -> None:
    """The op leaves id checks to the Python validation (eager, before any kernel); where that is skipped (under
    torch.compile) out-of-range mask ids are clamped into [0, M-1], as every backend does: the same outputs as the
    clamped mask."""
    args = [torch.randn(2, 3, 8), None, torch.randn(6, 2, 8), torch.randn(6, 8), None, 0, 1, False]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    args[4] = torch.tensor([[-1], [6]], device=device)
    out = torch.ops.l2p_fast.pool_forward(*args)
    args[4] = torch.tensor([[0], [5]], device=device)
    expected = torch.ops.l2p_fast.pool_forward(*args)
    assert out[4].tolist() == [[0], [5]]
    for got, want in zip(out, expected, strict=True):
        assert torch.equal(got, want)
