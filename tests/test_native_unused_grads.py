"""Backward of the native pool under torch.compile after an eager backward that created its shared zero
gradients, against the reference (a loss on some outputs only, eagerly, for every backend:
tests/test_backend_parity.py)."""

import pytest
import torch

from l2p_fast.testing import TOLERANCES, PoolCase, clone_pool, forward_and_grads, make_inputs, make_pool

pytestmark = pytest.mark.requires_backend("cpu")


def _compare(case: PoolCase, used: tuple[str, ...], seed: int) -> None:
    pool = make_pool(case, backend="cpu", seed=seed)
    ref = clone_pool(pool, "reference")
    inputs = make_inputs(case, seed=seed)
    _, _, weights = forward_and_grads(ref, inputs)
    weights = {key: weights[key] for key in used}
    _, expected, _ = forward_and_grads(ref, inputs, weights)
    _, got, _ = forward_and_grads(pool, inputs, weights)
    for name, grad in expected.items():
        if grad is None:  # not reached in the reference's graph; the fused op may hand back zeros
            assert got[name] is None or torch.count_nonzero(got[name]) == 0, name
        else:
            torch.testing.assert_close(got[name], grad, **TOLERANCES[case.dtype], msg=f"{used}: {name}")


def test_compiled_backward_after_eager_backward() -> None:
    case = PoolCase(batch=3, tokens=5, width=16, pool_size=5, top_k=2, length=2, embedding_key="cls", use_cls=True)
    _compare(case, ("reduce_sim",), seed=0)  # eager first: the zero buffer exists
    pool = make_pool(case, backend="cpu", seed=1)
    ref = clone_pool(pool, "reference")
    inputs = make_inputs(case, seed=1)
    torch._dynamo.reset()
    compiled = torch.compile(pool.forward, fullgraph=True)
    for module, forward in ((pool, compiled), (ref, ref.forward)):
        module.zero_grad(set_to_none=True)
        forward(inputs["x_embed"], cls_features=inputs["cls_features"])["reduce_sim"].backward()
    torch.testing.assert_close(pool.prompt_key.grad, ref.prompt_key.grad, **TOLERANCES[torch.float32])
    assert pool.prompt.grad is None or torch.count_nonzero(pool.prompt.grad) == 0
