"""Triton backend vs the reference: every output and every gradient, many random configurations.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1). Gathered / prepended values and ids must be exact;
similarity-derived values use the fp32 tolerances; in bf16/fp16 the kernel's error against an
fp32 run on the (exactly) upcast inputs may be at most about twice the reference's own error.
"""

from pathlib import Path

import pytest
import torch

from l2p_fast import FusedPromptPool
from l2p_fast.dispatch import unavailable_reason
from l2p_fast.reference import select
from l2p_fast.testing import TOLERANCES, PoolCase, clone_pool, forward_and_grads, make_inputs, make_pool, random_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")

VECTORS = Path(__file__).parent / "vectors" / "upstream_prompt_vectors.pt"
GRAD_KEYS = ("x_embed", "cls_features", "prompt", "prompt_key")


def _as_float(inputs: dict) -> dict:
    return {k: v.float() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check_close(name: str, got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor | None) -> None:
    """fp32: assert_close. Lower precision, elementwise: |got − truth| ≤ 2·max|ref − truth| + one ulp of the
    output dtype at |truth| (the rounding of the result itself) + the fp32 tolerance."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, name
    if truth is None:
        torch.testing.assert_close(got, ref, **TOLERANCES[ref.dtype], msg=name)
        return
    truth = truth.double()
    bound = 2 * _max_err(ref, truth) + torch.finfo(got.dtype).eps * truth.abs() + 1e-5 * (1 + truth.abs())
    error = (got.double() - truth).abs()
    assert bool((error <= bound).all()), f"{name}: error {error.max().item():.3e}, ref error {_max_err(ref, truth):.3e}"


def _reference_runs(pool, inputs: dict, weights: dict, low_precision: bool):
    out_ref, grads_ref, _ = forward_and_grads(pool, inputs, weights)
    if not low_precision:
        return out_ref, grads_ref, None, None
    # fp32 on the exactly upcast inputs: the values both runs approximate
    truth_weights = {k: w.float() if w.dtype != torch.float64 else w for k, w in weights.items()}
    truth_out, truth_grads, _ = forward_and_grads(clone_pool(pool, "reference").float(), _as_float(inputs),
                                                  truth_weights)
    return out_ref, grads_ref, truth_out, truth_grads


def assert_matches_reference(case: PoolCase, seed: int, module_dtype: torch.dtype | None = None) -> None:
    """Run ``case`` on the reference and on triton (same parameters, inputs, loss weights); compare all.

    Ids must equal the reference's. Only where two similarities are so close that rounding can swap
    them (the reference picks other ids), the kernel's ids must follow its own similarity row by the
    tie rule exactly, and the rest is compared with the reference run on the kernel's ids.
    """
    pool = make_pool(case, device=DEVICE, seed=seed)
    if module_dtype is not None:
        pool = pool.to(module_dtype)
    inputs = make_inputs(case, device=DEVICE, seed=seed + 1)
    out, grads, weights = forward_and_grads(clone_pool(pool, "triton"), inputs)
    low_precision = case.dtype in (torch.bfloat16, torch.float16) or module_dtype is not None
    out_ref, grads_ref, truth_out, truth_grads = _reference_runs(pool, inputs, weights, low_precision)
    if not torch.equal(out["prompt_idx"], out_ref["prompt_idx"]):
        assert inputs["prompt_mask"] is None, "with a prompt_mask the ids are the mask"
        own = select(out["similarity"], case.top_k, case.batchwise, None)
        assert torch.equal(out["prompt_idx"], own), "ids do not follow the kernel's own similarities"
        torch.testing.assert_close(out["similarity"], out_ref["similarity"], **TOLERANCES[torch.float32])
        inputs = dict(inputs, prompt_mask=out["prompt_idx"])
        out_ref, grads_ref, truth_out, truth_grads = _reference_runs(pool, inputs, weights, low_precision)
    assert list(out) == list(out_ref)
    assert out["total_prompt_len"] == out_ref["total_prompt_len"]
    assert out["prompt_idx"].dtype == torch.int64
    assert torch.equal(out["prompt_idx"], out_ref["prompt_idx"])
    pe, pe_ref = out["prompted_embedding"], out_ref["prompted_embedding"]
    assert pe.dtype == pe_ref.dtype and torch.equal(pe, pe_ref), "prompted_embedding must be a bit-exact copy"
    for key in ("prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim"):
        _check_close(key, out[key], out_ref[key], None if truth_out is None else truth_out[key])
    # selected_key is a copy of prompt_norm[idx] in the kernel too
    assert torch.equal(out["selected_key"], out["prompt_norm"][out["prompt_idx"]])
    for key in GRAD_KEYS:
        if grads_ref[key] is None:
            assert grads[key] is None, key
            continue
        assert grads[key] is not None, key
        _check_close(f"grad {key}", grads[key], grads_ref[key], None if truth_grads is None else truth_grads[key])


RANDOM = random_cases(21, seed=31, dtypes=(torch.float32, torch.bfloat16, torch.float16))


@pytest.mark.parametrize("index", range(len(RANDOM)))
def test_random_case_matches_reference(index: int) -> None:
    assert_matches_reference(RANDOM[index], seed=1000 + index)


@pytest.mark.parametrize("embedding_key", ["mean", "max", "mean_max", "cls"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_embedding_key_and_dtype(embedding_key: str, dtype: torch.dtype) -> None:
    case = PoolCase(batch=3, tokens=7, width=33, pool_size=7, top_k=3, length=2, embedding_key=embedding_key,
                    use_cls=embedding_key == "cls", dtype=dtype)
    assert_matches_reference(case, seed=7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_prompts_and_keys(dtype: torch.dtype) -> None:
    for learnable_key in (True, False):
        case = PoolCase(batch=3, tokens=5, width=24, pool_size=6, top_k=3, length=2, dtype=dtype,
                        embedding_key="mean_max", learnable_key=learnable_key)
        assert_matches_reference(case, seed=11, module_dtype=dtype)


@pytest.mark.parametrize(
    "case",
    [
        PoolCase(batch=1, tokens=1, width=5, pool_size=1, top_k=1, length=1),  # every size 1
        PoolCase(batch=5, tokens=9, width=19, pool_size=4, top_k=4, length=3, batchwise=True),  # K = M, vote
        PoolCase(batch=6, tokens=4, width=16, pool_size=9, top_k=2, length=2, batchwise=True, duplicate_keys=True),
        PoolCase(batch=4, tokens=6, width=12, pool_size=8, top_k=5, use_mask=True, batchwise=True),  # mask wins
        PoolCase(batch=3, tokens=5, width=12, pool_size=5, top_k=2, learnable_key=False, embedding_key="max"),
        PoolCase(batch=3, tokens=8, width=10, pool_size=6, top_k=3, non_contiguous=True, embedding_key="cls"),
    ],
    ids=["all-ones", "k-equals-m-vote", "vote-exact-ties", "mask", "mean-keys", "non-contiguous"],
)
def test_edge_cases(case: PoolCase) -> None:
    assert_matches_reference(case, seed=3)


def test_large_pool_every_prompt_selected() -> None:
    """M = K = 1024: the rank-based top-K over several tiles, every id exactly once per row."""
    assert_matches_reference(PoolCase(batch=2, tokens=3, width=16, pool_size=1024, top_k=1024, length=1), seed=5)
    assert_matches_reference(PoolCase(batch=3, tokens=3, width=8, pool_size=1024, top_k=5, batchwise=True), seed=6)


def test_exact_ties_go_to_the_lower_id() -> None:
    case = PoolCase(batch=4, tokens=3, width=8, pool_size=6, top_k=2, length=1)
    pool = make_pool(case, backend="triton", device=DEVICE, seed=0)
    with torch.no_grad():
        pool.prompt_key.copy_(pool.prompt_key[:1].expand(6, -1))  # all keys equal: every similarity ties
    out = pool(**make_inputs(case, device=DEVICE, seed=1))
    assert out["prompt_idx"].tolist() == [[0, 1]] * 4


def test_mask_with_repeated_ids_sums_prompt_gradients() -> None:
    case = PoolCase(batch=3, tokens=4, width=8, pool_size=5, top_k=3, length=2)
    pool = make_pool(case, backend="triton", device=DEVICE, seed=0)
    mask = torch.tensor([[4, 4, 1], [4, 0, 4], [1, 1, 1]], device=DEVICE)
    out = pool(make_inputs(case, device=DEVICE, seed=1)["x_embed"], prompt_mask=mask)
    out["prompted_embedding"].sum().backward()
    counts = torch.tensor([1.0, 4.0, 0.0, 0.0, 4.0], device=DEVICE)
    assert torch.equal(pool.prompt.grad, counts.view(5, 1, 1).expand(5, 2, 8))


def test_non_pool_prepend() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        pool = FusedPromptPool(length=3, embed_dim=11, backend="triton").to(DEVICE)
        twin = FusedPromptPool(length=3, embed_dim=11, backend="reference").to(DEVICE)
        twin.load_state_dict(pool.state_dict())
        x = torch.randn(4, 6, 11, device=DEVICE).to(dtype)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, ref = pool(xa), twin(xb)
        assert out["total_prompt_len"] == 3 and torch.equal(out["prompted_embedding"], ref["prompted_embedding"])
        weight = torch.randn(ref["prompted_embedding"].shape, device=DEVICE)
        (out["prompted_embedding"] * weight).sum().backward()
        (ref["prompted_embedding"] * weight).sum().backward()
        torch.testing.assert_close(pool.prompt.grad, twin.prompt.grad)
        assert torch.equal(xa.grad, xb.grad)


def test_golden_vectors_fp64() -> None:
    """Every third golden case of the port (float64): indices exact, values and gradients to 1e-12."""
    cases = torch.load(VECTORS, weights_only=True)["cases"][::3]
    for case in cases:
        pool = FusedPromptPool(**case["config"], backend="triton").double().to(DEVICE)
        pool.load_state_dict({"prompt": case["prompt"], "prompt_key": case["prompt_key"]})
        x_embed = case["x_embed"].to(DEVICE).requires_grad_(True)
        cls_features = case["cls_features"]
        if cls_features is not None:
            cls_features = cls_features.to(DEVICE).requires_grad_(True)
        mask = None if case["prompt_mask"] is None else case["prompt_mask"].to(DEVICE)
        out = pool(x_embed, prompt_mask=mask, cls_features=cls_features)
        loss = ((out["prompted_embedding"] * case["loss_weight_prompted"].to(DEVICE)).sum() - 0.1 * out["reduce_sim"]
                + (out["similarity"] * case["loss_weight_similarity"].to(DEVICE)).sum())
        loss.backward()
        for key, expected in case["out"].items():
            if isinstance(expected, int):
                assert out[key] == expected
            elif expected.dtype == torch.int64:
                assert torch.equal(out[key].cpu(), expected), key
            else:
                assert out[key].dtype == torch.float64, key
                torch.testing.assert_close(out[key].cpu(), expected, rtol=1e-12, atol=1e-12, msg=key)
        grads = {"x_embed": x_embed.grad, "cls_features": None if cls_features is None else cls_features.grad,
                 "prompt": pool.prompt.grad, "prompt_key": pool.prompt_key.grad}
        for key, expected in case["grad"].items():
            if expected is None:
                assert grads[key] is None or not grads[key].any(), key
            else:
                torch.testing.assert_close(grads[key].cpu(), expected, rtol=1e-12, atol=1e-12, msg=f"grad {key}")


@pytest.mark.parametrize(
    "case",
    [
        # tiles over rows (B > 16), tokens (N > 32), width (D > 128) and the pool (M > 64)
        PoolCase(batch=17, tokens=33, width=130, pool_size=65, top_k=2, length=1, embedding_key="mean_max"),
        # tiles over slots (K > 16) and (row, slot) pairs, with the vote
        PoolCase(batch=17, tokens=3, width=130, pool_size=17, top_k=17, length=3, batchwise=True,
                 embedding_key="max", learnable_key=False),
        # tiles over the prompt copies (Lp·D > 1024)
        PoolCase(batch=3, tokens=3, width=130, pool_size=2, top_k=2, length=9),
        PoolCase(batch=17, tokens=5, width=40, pool_size=20, top_k=3, length=2, embedding_key="cls", use_cls=True,
                 use_mask=True, dtype=torch.float64),
    ],
    ids=["per-sample", "vote", "long-prompts", "fp64-mask"],
)
def test_gpu_block_sizes(case: PoolCase, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's block sizes under the interpreter: every multi-tile loop (tokens, width, pool, slots, rows)."""
    from l2p_fast.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "GPU_BLOCKS_IN_INTERPRETER", True)
    assert_matches_reference(case, seed=17)
