"""Every fused backend against the reference, on every device it runs on (the ``fused_backend_device`` fixture):
forward outputs and the gradients of every input, many random configurations and the edge cases.

Ids must equal the reference's; gathered / prepended values are copies and must be bit-exact; every other
float tensor obeys flash-attention's rule against an fp64 reference, by its own dtype
(``l2p_fast.testing.assert_close_to_truth``). Only where two similarities are so close that rounding can swap
them may the backend pick other ids than the reference: then its ids must follow its own similarity row by
the tie rule exactly, and the rest is compared with the reference run on the backend's ids.
"""

import pytest
import torch

from l2p_fast import FusedPromptPool
from l2p_fast.testing import (
    GRAD_KEYS,
    OUTPUT_KEYS,
    PoolCase,
    assert_close_to_truth,
    clone_pool,
    forward_and_grads,
    loss_weights,
    make_inputs,
    make_pool,
    random_cases,
    select_by_rule,
    weighted_loss,
)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
CASES_PER_DTYPE = 10


def _to(inputs: dict, device: str, dtype: torch.dtype | None = None) -> dict:
    """``inputs`` on ``device``; float tensors cast to ``dtype`` when given (exact for an upcast)."""
    moved = {}
    for key, value in inputs.items():
        if value is not None:
            value = value.to(device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


def _fp64_truth(pool: FusedPromptPool, inputs: dict, weights: dict, idx: torch.Tensor) -> tuple[dict, dict]:
    """The reference in fp64 on the CPU, on the exactly upcast inputs and parameters, with ids forced to ``idx``."""
    truth_pool = clone_pool(pool, "reference").to("cpu", torch.float64)
    truth_inputs = dict(_to(inputs, "cpu", torch.float64), prompt_mask=idx.cpu())
    truth_weights = {key: w.to("cpu", torch.float64) for key, w in weights.items()}
    out, grads, _ = forward_and_grads(truth_pool, truth_inputs, truth_weights)
    return out, grads


def assert_matches_reference(case: PoolCase, backend: str, device: str, seed: int,
                             module_dtype: torch.dtype | None = None) -> None:
    """Run ``case`` on ``backend`` and on the reference (same device, parameters, inputs, loss weights); compare."""
    pool = make_pool(case, device=device, seed=seed)
    if module_dtype is not None:
        pool = pool.to(module_dtype)
    inputs = make_inputs(case, device=device, seed=seed + 1)
    out, grads, weights = forward_and_grads(clone_pool(pool, backend), inputs)
    low, low_grads, _ = forward_and_grads(pool, inputs, weights)
    idx = out["prompt_idx"]
    assert idx.dtype == torch.int64 and idx.shape == (case.batch, case.top_k)
    assert bool(((idx >= 0) & (idx < case.pool_size)).all()), "ids out of [0, M)"
    if not torch.equal(idx, low["prompt_idx"]):
        assert inputs["prompt_mask"] is None, "with a prompt_mask the ids are the mask"
        assert torch.equal(idx, select_by_rule(out["similarity"], case.top_k, case.batchwise)), (
            "ids do not follow the backend's own similarities by the tie rule")
        low, low_grads, _ = forward_and_grads(pool, dict(inputs, prompt_mask=idx), weights)
    truth, truth_grads = _fp64_truth(pool, inputs, weights, idx)
    assert list(out) == list(low)
    assert out["total_prompt_len"] == low["total_prompt_len"] == case.top_k * case.length
    assert torch.equal(idx, low["prompt_idx"])
    prompted, prompted_low = out["prompted_embedding"], low["prompted_embedding"]
    assert prompted.dtype == prompted_low.dtype and torch.equal(prompted, prompted_low), "prompted_embedding: copies"
    assert torch.equal(out["selected_key"], out["prompt_norm"][idx]), "selected_key: a copy of prompt_norm[idx]"
    for key in OUTPUT_KEYS:  # reduce_sim sums K cosines per row: its floor is relative to K
        scale = max(1.0, case.top_k) if key == "reduce_sim" else None
        assert_close_to_truth(key, out[key], low[key], truth[key], scale)
    for key in GRAD_KEYS:
        if low_grads[key] is None:
            assert grads[key] is None, f"grad {key}: the reference has none"
            continue
        assert grads[key] is not None, f"grad {key} missing"
        assert_close_to_truth(f"grad {key}", grads[key], low_grads[key], truth_grads[key])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(CASES_PER_DTYPE))
def test_random_cases(fused_backend_device: tuple[str, str], dtype: torch.dtype, index: int) -> None:
    case = random_cases(CASES_PER_DTYPE, seed=1000 + DTYPES.index(dtype), dtypes=(dtype,))[index]
    assert_matches_reference(case, *fused_backend_device, seed=index)


@pytest.mark.parametrize("embedding_key", ["mean", "max", "mean_max", "cls"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_each_embedding_key_and_dtype(fused_backend_device: tuple[str, str], embedding_key: str,
                                      dtype: torch.dtype) -> None:
    case = PoolCase(batch=3, tokens=7, width=33, pool_size=7, top_k=3, length=2, embedding_key=embedding_key,
                    use_cls=embedding_key == "cls", dtype=dtype)
    assert_matches_reference(case, *fused_backend_device, seed=7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("learnable_key", [True, False])
def test_low_precision_prompts_and_keys(fused_backend_device: tuple[str, str], dtype: torch.dtype,
                                        learnable_key: bool) -> None:
    case = PoolCase(batch=3, tokens=5, width=24, pool_size=6, top_k=3, length=2, dtype=dtype,
                    embedding_key="mean_max", learnable_key=learnable_key)
    assert_matches_reference(case, *fused_backend_device, seed=11, module_dtype=dtype)


EDGE_CASES = {
    "all-ones": PoolCase(batch=1, tokens=1, width=5, pool_size=1, top_k=1, length=1),
    "B1-K=M-wide": PoolCase(batch=1, tokens=97, width=123, pool_size=10, top_k=10, length=5, embedding_key="mean_max"),
    "K1-vote": PoolCase(batch=13, tokens=3, width=33, pool_size=17, top_k=1, embedding_key="max", batchwise=True),
    "K=M-vote": PoolCase(batch=5, tokens=9, width=19, pool_size=4, top_k=4, length=3, batchwise=True),
    "vote-exact-ties": PoolCase(batch=6, tokens=4, width=16, pool_size=9, top_k=2, batchwise=True, duplicate_keys=True),
    "cls-vote-ties": PoolCase(batch=8, tokens=7, width=64, pool_size=5, top_k=3, embedding_key="cls", use_cls=True,
                              batchwise=True, duplicate_keys=True),
    "mask-over-vote": PoolCase(batch=4, tokens=6, width=12, pool_size=8, top_k=5, use_mask=True, batchwise=True),
    "mask-noncontig": PoolCase(batch=3, tokens=7, width=16, pool_size=6, top_k=4, embedding_key="cls", use_mask=True,
                               non_contiguous=True),
    "keys-from-prompts": PoolCase(batch=5, tokens=9, width=33, pool_size=6, top_k=2, learnable_key=False),
    "keys-from-prompts-max": PoolCase(batch=3, tokens=5, width=12, pool_size=5, top_k=2, learnable_key=False,
                                      embedding_key="max"),
    "noncontig-cls": PoolCase(batch=3, tokens=8, width=10, pool_size=6, top_k=3, non_contiguous=True,
                              embedding_key="cls"),
    # the GPU block sizes' multi-tile loops: rows (B > 16), tokens (N > 32), width (D > 128), pool (M > 64)
    "tiles-per-sample": PoolCase(batch=17, tokens=33, width=130, pool_size=65, top_k=2, length=1,
                                 embedding_key="mean_max"),
    "tiles-vote": PoolCase(batch=17, tokens=3, width=130, pool_size=17, top_k=17, length=3, batchwise=True,
                           embedding_key="max", learnable_key=False),
    "tiles-long-prompts": PoolCase(batch=3, tokens=3, width=130, pool_size=2, top_k=2, length=9),
    "fp64-mask": PoolCase(batch=17, tokens=5, width=40, pool_size=20, top_k=3, length=2, embedding_key="cls",
                          use_cls=True, use_mask=True, dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(fused_backend_device: tuple[str, str], name: str) -> None:
    assert_matches_reference(EDGE_CASES[name], *fused_backend_device, seed=3)


def test_large_pool_every_prompt_selected(fused_backend_device: tuple[str, str]) -> None:
    """M = K = 1024: every id exactly once per row; and a vote over a pool of 1024."""
    backend, device = fused_backend_device
    assert_matches_reference(PoolCase(batch=2, tokens=3, width=16, pool_size=1024, top_k=1024, length=1),
                             backend, device, seed=5)
    assert_matches_reference(PoolCase(batch=3, tokens=3, width=8, pool_size=1024, top_k=5, batchwise=True),
                             backend, device, seed=6)


def test_exact_ties_go_to_the_lower_id(backend_device: tuple[str, str]) -> None:
    backend, device = backend_device
    case = PoolCase(batch=4, tokens=3, width=8, pool_size=6, top_k=2, length=1)
    pool = make_pool(case, backend=backend, device=device, seed=0)
    with torch.no_grad():
        pool.prompt_key.copy_(pool.prompt_key[:1].expand(6, -1))  # all keys equal: every similarity ties
    out = pool(**make_inputs(case, device=device, seed=1))
    assert out["prompt_idx"].tolist() == [[0, 1]] * 4


def test_mask_with_repeated_ids_sums_prompt_gradients(backend_device: tuple[str, str]) -> None:
    backend, device = backend_device
    case = PoolCase(batch=3, tokens=4, width=8, pool_size=5, top_k=3, length=2)
    pool = make_pool(case, backend=backend, device=device, seed=0)
    mask = torch.tensor([[4, 4, 1], [4, 0, 4], [1, 1, 1]], device=device)
    out = pool(make_inputs(case, device=device, seed=1)["x_embed"], prompt_mask=mask)
    out["prompted_embedding"].sum().backward()
    counts = torch.tensor([1.0, 4.0, 0.0, 0.0, 4.0], device=device)
    assert torch.equal(pool.prompt.grad, counts.view(5, 1, 1).expand(5, 2, 8))


def test_cls_query_token_gradient_is_the_token_slice(backend_device: tuple[str, str]) -> None:
    """With cls_features as the query, grad x_embed is exactly the token slice of grad prompted_embedding."""
    backend, device = backend_device
    case = PoolCase(batch=2, tokens=4, width=8, pool_size=4, top_k=2, length=3, embedding_key="cls", use_cls=True)
    pool = make_pool(case, backend=backend, device=device, seed=0)
    _, grads, weights = forward_and_grads(pool, make_inputs(case, device=device, seed=1))
    assert torch.equal(grads["x_embed"], weights["prompted_embedding"][:, case.top_k * case.length:])
    assert grads["cls_features"] is not None and grads["cls_features"].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_pool_prepend(fused_backend_device: tuple[str, str], dtype: torch.dtype) -> None:
    backend, device = fused_backend_device
    torch.manual_seed(0)
    pool = FusedPromptPool(length=3, embed_dim=11, backend=backend).to(device)
    twin = FusedPromptPool(length=3, embed_dim=11, backend="reference").to(device)
    twin.load_state_dict(pool.state_dict())
    x = torch.randn(4, 6, 11, device=device).to(dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = pool(xa), twin(xb)
    assert out["total_prompt_len"] == 3
    assert out["prompted_embedding"].dtype == ref["prompted_embedding"].dtype
    assert torch.equal(out["prompted_embedding"], ref["prompted_embedding"])
    weight = torch.randn(ref["prompted_embedding"].shape, device=device)
    (out["prompted_embedding"] * weight).sum().backward()
    (ref["prompted_embedding"] * weight).sum().backward()
    assert torch.equal(pool.prompt.grad, twin.prompt.grad)  # the sum over the batch in the same order
    assert torch.equal(xa.grad, xb.grad)  # a copy of the token slice


@pytest.mark.parametrize("embedding_key", ["cls", "mean_max"])
@pytest.mark.parametrize("used", [("prompted_embedding",), ("reduce_sim",), ("similarity", "selected_key"),
                                  ("x_embed_norm", "prompt_norm")], ids="+".join)
def test_loss_on_some_outputs_only(fused_backend_device: tuple[str, str], used: tuple[str, ...],
                                   embedding_key: str) -> None:
    """A loss that reads only some outputs: the gradients the reference has match; where the reference has
    none, the backend gives none or zeros (twice in a row: reused zero buffers must stay zero)."""
    backend, device = fused_backend_device
    case = PoolCase(batch=5, tokens=7, width=24, pool_size=6, top_k=3, length=2, embedding_key=embedding_key,
                    use_cls=embedding_key == "cls", batchwise=True)
    for seed in (0, 1):
        pool = make_pool(case, device=device, seed=seed)
        inputs = make_inputs(case, device=device, seed=seed)
        weights = loss_weights(pool(**inputs), seed=seed)
        weights = {key: weights[key] for key in used}
        _, expected, _ = forward_and_grads(pool, inputs, weights)
        _, got, _ = forward_and_grads(clone_pool(pool, backend), inputs, weights)
        for name, grad in expected.items():
            if grad is None:
                assert got[name] is None or torch.count_nonzero(got[name]) == 0, name
            else:
                torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5, msg=f"{used}: {name}")


@pytest.mark.requires_backend("cpu")
def test_auto_picks_the_native_backend_on_cpu() -> None:
    assert FusedPromptPool(backend="auto").resolved_backend("cpu") == "cpu"


@pytest.mark.requires_backend("triton")
@pytest.mark.parametrize("name", [name for name in EDGE_CASES if name.startswith(("tiles", "fp64"))])
def test_triton_gpu_block_sizes_in_the_interpreter(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton on CPU tensors with the block sizes it picks on a GPU: every multi-tile loop runs."""
    from l2p_fast.ops import triton_launch

    monkeypatch.setattr(triton_launch, "GPU_BLOCKS_IN_INTERPRETER", True)
    assert_matches_reference(EDGE_CASES[name], "triton", "cpu", seed=17)


def test_loss_weights_touch_every_float_output() -> None:
    out = make_pool(PoolCase(), seed=0)(**make_inputs(PoolCase(), seed=0))
    weights = loss_weights(out)
    assert set(weights) == {*OUTPUT_KEYS, "prompted_embedding"}
    assert weighted_loss(out, weights).requires_grad
