"""The fused native op l2p_fast::pool_forward (+ its backward) against the reference, on the CPU.

Many fresh random configurations per dtype: odd D and N, B=1, K=1, K=M, batch votes (duplicate ids),
masks, every embedding_key, non-contiguous inputs, keys not learnable, exact ties (duplicate keys).
"""

import pytest
import torch

from l2p_fast import _native, ops
from l2p_fast import reference as ref
from l2p_fast.testing import (
    TOLERANCES,
    PoolCase,
    clone_pool,
    forward_and_grads,
    loss_weights,
    make_inputs,
    make_pool,
    random_cases,
    weighted_loss,
)

pytestmark = pytest.mark.skipif(
    not (_native.is_built() and hasattr(torch.ops.l2p_fast, "pool_forward")),
    reason=f"native op l2p_fast::pool_forward missing: {_native.LOAD_ERROR}",
)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
CASES_PER_DTYPE = 14


def _similarity_tolerance(dtype: torch.dtype) -> dict[str, float]:
    # similarity-family outputs are computed in max(dtype, fp32)
    return TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]


def _compare(case: PoolCase, seed: int) -> None:
    pool = make_pool(case, seed=seed)
    inputs = make_inputs(case, seed=seed)
    native = clone_pool(pool, "cpu")
    got, got_grads, weights = forward_and_grads(native, inputs)
    idx = got["prompt_idx"]
    # The selection follows the tie rule on our similarities exactly (the reference's BLAS matmul can
    # break exact ties between duplicate keys either way, so ids are checked against the rule itself).
    expected_idx = ref.select(got["similarity"], case.top_k, case.batchwise, inputs["prompt_mask"])
    assert torch.equal(idx, expected_idx)
    if not case.duplicate_keys:
        assert torch.equal(idx, pool(**inputs)["prompt_idx"])
    # The reference on the same selection: every other output and every gradient.
    forced = dict(inputs, prompt_mask=idx)
    expected, expected_grads, _ = forward_and_grads(pool, forced, weights)
    assert torch.equal(got["prompted_embedding"], expected["prompted_embedding"])  # copies: bit-exact
    assert got["prompted_embedding"].dtype == expected["prompted_embedding"].dtype
    assert got["total_prompt_len"] == expected["total_prompt_len"]
    tol = _similarity_tolerance(case.dtype)
    for key in ("prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim"):
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, key
        torch.testing.assert_close(got[key], expected[key], **tol, msg=key)
    grad_tol = tol if case.dtype in (torch.float64, torch.float32) else TOLERANCES[case.dtype]
    for key, value in expected_grads.items():
        if value is None:
            assert got_grads[key] is None, key
            continue
        assert got_grads[key].dtype == value.dtype and got_grads[key].shape == value.shape, key
        torch.testing.assert_close(got_grads[key], value, **grad_tol, msg=f"grad {key}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(CASES_PER_DTYPE))
def test_random_cases_match_reference(dtype: torch.dtype, index: int) -> None:
    case = random_cases(CASES_PER_DTYPE, seed=1000 + DTYPES.index(dtype), dtypes=(dtype,))[index]
    _compare(case, seed=index)


@pytest.mark.parametrize(
    "case",
    [
        PoolCase(batch=1, tokens=97, width=123, pool_size=10, top_k=10, length=5, embedding_key="mean_max"),
        PoolCase(batch=13, tokens=3, width=33, pool_size=17, top_k=1, embedding_key="max", batchwise=True),
        PoolCase(batch=8, tokens=7, width=64, pool_size=5, top_k=3, embedding_key="cls", use_cls=True,
                 batchwise=True, duplicate_keys=True),
        PoolCase(batch=3, tokens=7, width=16, pool_size=6, top_k=4, embedding_key="cls", use_mask=True,
                 non_contiguous=True),
        PoolCase(batch=5, tokens=9, width=33, pool_size=6, top_k=2, learnable_key=False, embedding_key="mean"),
    ],
    ids=["B1-K=M", "K1-vote", "cls-vote-ties", "mask-noncontig", "keys-from-prompts"],
)
def test_edge_cases_match_reference(case: PoolCase) -> None:
    _compare(case, seed=7)


def test_keys_from_prompt_mean_get_gradient_through_torch() -> None:
    """keys = prompt.mean(1) computed by torch: the key gradient reaches prompt through autograd."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 10, generator=gen, dtype=torch.float64)
    prompt = torch.randn(5, 3, 10, generator=gen, dtype=torch.float64)
    results = []
    for fn in (ops.pool_forward, ref.pool_forward):
        p = prompt.clone().requires_grad_(True)
        out = fn(x, p, p.mean(1), embedding_key="mean", top_k=2, batchwise=True)
        (out["prompted_embedding"].sum() * 0.5 + out["reduce_sim"] * 3 + out["similarity"].sum()).backward()
        results.append((out["prompt_idx"], p.grad))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


def test_auto_picks_native_on_cpu() -> None:
    pool = make_pool(PoolCase(), backend="auto")
    assert pool.resolved_backend("cpu") == "cpu"


def test_x_grad_is_the_token_slice_with_cls_features() -> None:
    """With cls_features as the query, grad x_embed is exactly the token slice of grad prompted."""
    case = PoolCase(embedding_key="cls", use_cls=True)
    pool = make_pool(case, backend="cpu", seed=0)
    inputs = make_inputs(case, seed=1)
    x = inputs["x_embed"].requires_grad_(True)
    out = pool(x, cls_features=inputs["cls_features"])
    grad = torch.randn_like(out["prompted_embedding"])
    out["prompted_embedding"].backward(grad)
    assert torch.equal(x.grad, grad[:, case.top_k * case.length:])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": 4}, "mode must be in"),
        ({"mode": 3}, "cls_features must be given exactly when mode == 3"),
        ({"top_k": 7}, r"top_k must be in \[1, M = 6\]"),
        ({"prompt_mask": torch.tensor([[0], [6]])}, r"prompt_mask ids must be in \[0, 6\)"),
        ({"prompt_mask": torch.zeros(2, 1)}, "prompt_mask must be an integer"),
        ({"keys": torch.randn(5, 8)}, r"keys must be a float \(M, D\) = \(6, 8\)"),
    ],
)
def test_op_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"x_embed": torch.randn(2, 3, 8), "cls_features": None, "prompt": torch.randn(6, 2, 8),
            "keys": torch.randn(6, 8), "prompt_mask": None, "mode": 0, "top_k": 2, "batchwise": False}
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.l2p_fast.pool_forward(*args.values())


def test_unused_outputs_get_no_gradient_work() -> None:
    """Only reduce_sim used: prompts get a zero gradient (the reference: None), the rest matches."""
    case = PoolCase(embedding_key="mean_max", batchwise=True)
    pool = make_pool(case, seed=2)
    twin = clone_pool(pool, "cpu")
    inputs = make_inputs(case, seed=3)
    grads = []
    for module in (pool, twin):
        x = inputs["x_embed"].clone().requires_grad_(True)
        module(x)["reduce_sim"].backward()
        grads.append((x.grad, module.prompt.grad, module.prompt_key.grad))
    assert grads[0][1] is None and not grads[1][1].any()
    for got, expected in ((grads[1][0], grads[0][0]), (grads[1][2], grads[0][2])):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_loss_weights_touch_every_float_output() -> None:
    out = make_pool(PoolCase(), backend="cpu", seed=0)(**make_inputs(PoolCase(), seed=0))
    weights = loss_weights(out)
    assert set(weights) == {"prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim",
                            "prompted_embedding"}
    assert weighted_loss(out, weights).requires_grad
