"""Each backend as PyTorch sees it, on every device it runs on (the ``backend_device`` fixtures):
``torch.library.opcheck`` of every l2p_fast op its forward and backward call, fp64 gradcheck,
``torch.compile(fullgraph=True)`` parity (with and without a ``prompt_mask``) and a deterministic backward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from l2p_fast import FusedPromptPool
from l2p_fast.testing import PoolCase, clone_pool, forward_and_grads, loss_weights, make_inputs, make_pool


class _RecordOps(TorchDispatchMode):
    """Records every call of an ``l2p_fast::`` op (below autograd): the op and copies of its arguments, which
    require grad where the call was differentiable (grad mode on: not inside a plain backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "l2p_fast":
            grad = torch.is_grad_enabled()
            copy = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t: t.detach().clone().requires_grad_(grad and t.requires_grad), (args, kwargs))
            self.calls.append((func, *copy))
        return func(*args, **kwargs)


OPCHECK_CASES = {
    "mean_max-vote": PoolCase(batch=3, tokens=5, width=20, pool_size=6, top_k=3, embedding_key="mean_max",
                              batchwise=True),
    "cls-mask": PoolCase(batch=3, tokens=4, width=12, pool_size=6, top_k=2, embedding_key="cls", use_cls=True,
                         use_mask=True),
    "max-bf16-keys-from-prompts": PoolCase(batch=2, tokens=3, width=8, pool_size=4, top_k=2, embedding_key="max",
                                           learnable_key=False, dtype=torch.bfloat16),
    "mean-fp64": PoolCase(batch=2, tokens=3, width=8, pool_size=5, top_k=2, dtype=torch.float64),
}


def _recorded_calls(backend: str, device: str, case: PoolCase, used: tuple[str, ...] | None) -> list[tuple]:
    """The l2p_fast ops one forward + backward of ``case`` calls (a loss on the outputs ``used``; None: all)."""
    pool = make_pool(case, backend=backend, device=device, seed=0)
    inputs = make_inputs(case, device=device, seed=1)
    weights = loss_weights(pool(**inputs))
    if used is not None:
        weights = {key: weights[key] for key in used}
    with _RecordOps() as recorder:
        forward_and_grads(pool, inputs, weights)
    return recorder.calls


@pytest.mark.parametrize("used", [None, ("reduce_sim",)], ids=["all-outputs", "reduce_sim-only"])
@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_every_op_called(fused_backend_device: tuple[str, str], name: str, used: tuple | None) -> None:
    """opcheck (schema, fake tensor, autograd registration, AOT dispatch) of every l2p_fast op the backend
    calls in a forward and backward, with the arguments of that call."""
    calls = _recorded_calls(*fused_backend_device, OPCHECK_CASES[name], used)
    assert calls, "the backend called no registered l2p_fast op"
    for op, args, kwargs in calls:
        torch.library.opcheck(op, args, kwargs)


def test_opcheck_non_pool_prepend(fused_backend_device: tuple[str, str]) -> None:
    backend, device = fused_backend_device
    pool = FusedPromptPool(length=3, embed_dim=9, backend=backend).to(device)
    x = torch.randn(2, 4, 9, device=device, dtype=torch.bfloat16, requires_grad=True)
    with _RecordOps() as recorder:
        pool(x)["prompted_embedding"].sum().backward()
    for op, args, kwargs in recorder.calls:  # a backend may prepend with plain torch ops
        torch.library.opcheck(op, args, kwargs)


GRADCHECK_CASES = {
    "mean_max-vote": PoolCase(batch=2, tokens=3, width=4, pool_size=3, top_k=2, length=2, embedding_key="mean_max",
                              batchwise=True, dtype=torch.float64),
    "cls-mask": PoolCase(batch=2, tokens=3, width=4, pool_size=3, top_k=2, length=2, embedding_key="cls",
                         use_cls=True, use_mask=True, dtype=torch.float64),
    "max-keys-from-prompts": PoolCase(batch=2, tokens=3, width=4, pool_size=3, top_k=1, length=2, embedding_key="max",
                                      learnable_key=False, dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_fp64(backend_device: tuple[str, str], name: str) -> None:
    """Every float output against finite differences, w.r.t. x_embed, cls_features, prompt and prompt_key."""
    backend, device = backend_device
    case = GRADCHECK_CASES[name]
    pool = make_pool(case, backend=backend, device=device, seed=2)
    inputs = make_inputs(case, device=device, seed=3)
    names = [name for name, _ in pool.named_parameters()]

    def run(x_embed, *rest):
        cls_features = rest[-1] if case.use_cls else None
        params = dict(zip(names, rest[: len(names)], strict=True))
        out = torch.func.functional_call(pool, params, (x_embed,),
                                         {"prompt_mask": inputs["prompt_mask"], "cls_features": cls_features})
        return tuple(v for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point())

    leaves = [inputs["x_embed"], *(p.detach() for p in pool.parameters())]
    if case.use_cls:
        leaves.append(inputs["cls_features"])
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    assert torch.autograd.gradcheck(run, tuple(leaves), eps=1e-6, atol=1e-7, fast_mode=True)


COMPILE_CASES = {
    "cls-vote": PoolCase(batch=4, tokens=7, width=16, pool_size=6, top_k=3, embedding_key="cls", use_cls=True,
                         batchwise=True),
    "mean_max-keys-from-prompts": PoolCase(batch=3, tokens=5, width=8, pool_size=5, top_k=2,
                                           embedding_key="mean_max", learnable_key=False),
    "prompt_mask": PoolCase(batch=3, tokens=5, width=8, pool_size=6, top_k=2, embedding_key="mean", use_mask=True,
                            batchwise=True),
}


@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_compile_fullgraph_parity(backend_device: tuple[str, str], name: str) -> None:
    """torch.compile(fullgraph=True) of the module's forward: the same outputs and gradients as eager (fused
    backends bit-exact: the compiled graph calls the same ops; the reference up to Inductor's rounding)."""
    backend, device = backend_device
    case = COMPILE_CASES[name]
    torch._dynamo.reset()
    pool = make_pool(case, backend=backend, device=device, seed=0)
    inputs = make_inputs(case, device=device, seed=1)
    eager_out, eager_grads, weights = forward_and_grads(pool, inputs)
    twin = clone_pool(pool, backend)
    twin.forward = torch.compile(twin.forward, fullgraph=True)
    compiled_out, compiled_grads, _ = forward_and_grads(twin, inputs, weights)
    tol = {"rtol": 0, "atol": 0} if backend != "reference" else {"rtol": 1e-5, "atol": 1e-6}
    assert list(compiled_out) == list(eager_out)
    for key, value in eager_out.items():
        if not isinstance(value, torch.Tensor):
            assert compiled_out[key] == value, key
        elif key in ("prompt_idx", "prompted_embedding"):
            assert torch.equal(compiled_out[key], value), key
        else:
            torch.testing.assert_close(compiled_out[key], value, **tol, msg=key)
    for key, value in eager_grads.items():
        if value is None:
            assert compiled_grads[key] is None, key
        else:
            torch.testing.assert_close(compiled_grads[key], value, **tol, msg=f"grad {key}")


@pytest.mark.parametrize("use_mask", [False, True])
def test_backward_is_deterministic(backend_device: tuple[str, str], use_mask: bool) -> None:
    """Two runs on identical inputs: bit-identical outputs and gradients (the vote and the mask repeat ids, so
    several rows add into the same prompt's gradient)."""
    backend, device = backend_device
    case = PoolCase(batch=13, tokens=9, width=33, pool_size=6, top_k=3, length=2, batchwise=True,
                    embedding_key="mean_max", use_mask=use_mask, learnable_key=not use_mask)
    pool = make_pool(case, backend=backend, device=device, seed=5)
    inputs = make_inputs(case, device=device, seed=6)
    first, grads_a, weights = forward_and_grads(pool, inputs)
    if not use_mask:
        assert (first["prompt_idx"] == first["prompt_idx"][:1]).all()  # the vote: every row the same ids
    second, grads_b, _ = forward_and_grads(pool, inputs, weights)
    for key, value in first.items():
        assert (value == second[key]) if isinstance(value, int) else torch.equal(value, second[key]), key
    for key, grad in grads_a.items():
        assert (grad is None and grads_b[key] is None) or torch.equal(grad, grads_b[key]), f"grad {key}"
