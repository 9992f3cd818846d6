"""NaN, ±inf, overflowing sums and out-of-range ids in the kernels, against the reference (docs/behaviour.md §4.3).

Rule for every backend: the reference's order — NaN ranks above every number, equal values (NaNs among
themselves too) by lower id — so every output slot is written and ids always lie in [0, M); the max query
propagates NaN as ``torch.max`` does (the first NaN wins, and the gradient flows to it); out-of-range ids that
reach a kernel (the Python value check is skipped under ``torch.compile``) are clamped into [0, M − 1].
Every CPU backend runs: reference, cpu (C++), triton (its interpreter).
"""

from __future__ import annotations

import pytest
import torch

from l2p_fast import FusedPromptPool, _native, reference
from l2p_fast.testing import TOLERANCES, backend_skip_reason

B, N, D, M, K, LP = 4, 7, 12, 6, 3, 2
CPU_BACKENDS = ("reference", "cpu", "triton")
NAN, INF = float("nan"), float("inf")


def _backends() -> list:
    params = []
    for name in CPU_BACKENDS:
        reason = backend_skip_reason(name, "cpu")
        marks = [pytest.mark.skip(reason=f"backend={name!r} on cpu: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _pool(backend: str, embedding_key: str, batchwise: bool = False, dtype: torch.dtype = torch.float32) -> FusedPromptPool:
    torch.manual_seed(0)
    pool = FusedPromptPool(length=LP, embed_dim=D, embedding_key=embedding_key, prompt_pool=True, prompt_key=True,
                           pool_size=M, top_k=K, batchwise_prompt=batchwise, backend=backend)
    return pool.to(dtype)


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(B, N, D, generator=gen).to(dtype), torch.randn(B, D, generator=gen).to(dtype)


def _same(name: str, got: torch.Tensor, want: torch.Tensor, exact: bool = False) -> None:
    """Equal values, NaN and ±inf at the same places (copies exactly, similarity-derived values by tolerance)."""
    tol = {"rtol": 0.0, "atol": 0.0} if exact else TOLERANCES[want.dtype]
    torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{name}: {m}", **tol)


def _check_ids(out: dict) -> None:
    ids = out["prompt_idx"]
    assert ids.dtype == torch.int64 and bool(((ids >= 0) & (ids < M)).all()), f"ids outside [0, {M}): {ids}"


def _compare_forward(out: dict, ref: dict) -> None:
    _check_ids(out)
    assert torch.equal(out["prompt_idx"], ref["prompt_idx"]), f"ids {out['prompt_idx']} != reference {ref['prompt_idx']}"
    for key in ("prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim"):
        _same(key, out[key], ref[key])
    _same("prompted_embedding", out["prompted_embedding"], ref["prompted_embedding"], exact=True)


def _poison(where: str, x: torch.Tensor, cls: torch.Tensor, pool: FusedPromptPool, value: float) -> None:
    with torch.no_grad():
        if where == "x_embed":
            x[1, 3, 5] = value
        elif where == "cls_features":
            cls[2, 4] = value
        elif where == "keys":
            pool.prompt_key[2, 0] = value
        elif where == "x_embed_overflow":  # finite values whose token sum overflows the compute dtype
            x[1] = 3e38
            x[2, :, 0] = -3e38


SELECTION_CASES = [
    ("mean", "x_embed", NAN), ("mean", "x_embed", INF), ("mean", "x_embed", -INF),
    ("mean_max", "x_embed", NAN), ("cls", "cls_features", NAN), ("cls", "cls_features", INF),
    ("mean", "keys", NAN), ("mean", "keys", INF), ("cls", "keys", -INF), ("mean", "x_embed_overflow", 0.0),
]


@pytest.mark.parametrize("batchwise", [False, True], ids=["per-sample", "batch-vote"])
@pytest.mark.parametrize(("embedding_key", "where", "value"), SELECTION_CASES)
@pytest.mark.parametrize("backend", _backends())
def test_selection_with_nan_inf_and_overflow_follows_the_reference(
    backend: str, embedding_key: str, where: str, value: float, batchwise: bool
) -> None:
    pool, ref_pool = _pool(backend, embedding_key, batchwise), _pool("reference", embedding_key, batchwise)
    x, cls = _inputs()
    _poison(where, x, cls, pool, value)
    _poison(where, x.clone(), cls.clone(), ref_pool, value)  # the same key edit on the reference's copy
    cls_arg = cls if embedding_key == "cls" else None
    with torch.no_grad():
        out, ref = pool(x, cls_features=cls_arg), ref_pool(x, cls_features=cls_arg)
    assert not torch.isfinite(ref["similarity"]).all(), "the case must put a non-finite value into the scores"
    _compare_forward(out, ref)


@pytest.mark.parametrize("backend", _backends())
def test_fp16_near_its_largest_value_selects_as_the_reference(backend: str) -> None:
    pool, ref_pool = _pool(backend, "mean_max", dtype=torch.float16), _pool("reference", "mean_max", dtype=torch.float16)
    x, _ = _inputs(torch.float16)
    x[1] = 65504.0
    x[2, :, :3] = -65504.0
    with torch.no_grad():
        out, ref = pool(x), ref_pool(x)
    _compare_forward(out, ref)


@pytest.mark.parametrize("embedding_key", ["max", "mean_max", "cls"])
@pytest.mark.parametrize("backend", _backends())
def test_max_query_propagates_nan_and_its_gradient_as_torch_max(backend: str, embedding_key: str) -> None:
    """'cls' without cls_features takes the token max. Row 1 has two NaNs in feature 3 (the first wins), row 2
    one in feature 7 at the first token; rows 0 and 3 stay finite."""
    pool, ref_pool = _pool(backend, embedding_key), _pool("reference", embedding_key)
    x, _ = _inputs()
    x[1, 4, 3] = NAN
    x[1, 6, 3] = NAN
    x[2, 0, 7] = NAN
    results = []
    for module in (pool, ref_pool):
        leaf = x.clone().requires_grad_(True)
        out = module(leaf)
        out["reduce_sim"].backward()
        results.append((out, leaf.grad))
    (out, grad), (ref, ref_grad) = results
    assert torch.isnan(ref["similarity"][1]).all() and torch.isfinite(ref["similarity"][0]).all()
    _compare_forward(out, ref)
    # where the gradient flows: NaN at each feature's first NaN token (or the argmax of a finite feature)
    _same("x_embed.grad", grad, ref_grad)


def _bad_mask() -> torch.Tensor:
    return torch.tensor([[-1, 0, 2], [M, M + 5, 1], [3, -100, M - 1], [2, 2, 2]])


@pytest.mark.skipif(not _native.is_built(), reason=f"native extension missing: {_native.LOAD_ERROR}")
@pytest.mark.parametrize("mode", [0, 1, 3])
def test_native_pool_clamps_out_of_range_mask_ids(mode: int) -> None:
    """The C++ op called directly (as under torch.compile, where the Python value check is skipped)."""
    pool = _pool("reference", "cls" if mode == 3 else ("mean" if mode == 0 else "max"))
    x, cls = _inputs()
    keys, prompt = pool.prompt_key.detach(), pool.prompt.detach()
    bad, clamped = _bad_mask(), _bad_mask().clamp(0, M - 1)
    got = torch.ops.l2p_fast.pool_forward(x, cls if mode == 3 else None, prompt, keys, bad, mode, K, False)
    want = torch.ops.l2p_fast.pool_forward(x, cls if mode == 3 else None, prompt, keys, clamped, mode, K, False)
    assert torch.equal(got[4], clamped)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    ref = reference.pool_forward(x, prompt, keys, embedding_key=pool.embedding_key, top_k=K, batchwise=False,
                                 cls_features=cls if mode == 3 else None, prompt_mask=clamped)
    assert torch.equal(got[0], ref["prompted_embedding"])


@pytest.mark.skipif(not _native.is_built(), reason=f"native extension missing: {_native.LOAD_ERROR}")
def test_native_pool_backward_clamps_out_of_range_ids() -> None:
    x, _ = _inputs()
    pool = _pool("reference", "mean")
    fwd = torch.ops.l2p_fast.pool_forward(x, None, pool.prompt.detach(), pool.prompt_key.detach(), _bad_mask().clamp(0, M - 1),
                                          0, K, False)
    prompted, x_norm, prompt_norm, _sim, _idx, _sel, _rs, argmax, q_ss, k_ss = fwd
    grad_out = torch.randn_like(prompted)
    grad_rs = torch.tensor(0.5)

    def backward(idx: torch.Tensor) -> tuple:
        return torch.ops.l2p_fast.pool_backward(
            grad_out, None, None, None, None, grad_rs, x_norm, prompt_norm, q_ss, k_ss, idx, argmax, 0, LP,
            x.dtype, x.dtype, torch.float32, torch.float32, True, False, True, True)

    for got, want in zip(backward(_bad_mask()), backward(_bad_mask().clamp(0, M - 1)), strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif(not _native.is_built(), reason=f"native extension missing: {_native.LOAD_ERROR}")
def test_native_assembly_clamps_out_of_range_ids() -> None:
    x, _ = _inputs()
    prompt = torch.randn(M, LP, D)
    cls, pos = torch.randn(1, 1, D), torch.randn(1, 1 + K * LP + N, D)
    got = torch.ops.l2p_fast.assemble(x, prompt, _bad_mask(), cls, pos)
    assert torch.equal(got, torch.ops.l2p_fast.assemble(x, prompt, _bad_mask().clamp(0, M - 1), cls, pos))
    grad = torch.randn_like(got)
    assert torch.equal(torch.ops.l2p_fast.assemble_prompt_grad(grad, _bad_mask(), M, LP),
                       torch.ops.l2p_fast.assemble_prompt_grad(grad, _bad_mask().clamp(0, M - 1), M, LP))


@pytest.mark.skipif(backend_skip_reason("triton", "cpu") is not None, reason=f"triton: {backend_skip_reason('triton', 'cpu')}")
def test_triton_kernels_clamp_out_of_range_ids() -> None:
    """The Triton launchers do not check id values (the ops do, in eager mode): their kernels clamp."""
    from l2p_fast.ops import assemble_triton, pool_triton

    x, _ = _inputs()
    pool = _pool("reference", "mean")
    prompt, keys = pool.prompt.detach(), pool.prompt_key.detach()
    bad, clamped = _bad_mask(), _bad_mask().clamp(0, M - 1)
    got = pool_triton.launch_pool_forward(x, prompt, keys, None, bad, 0, K, False)
    want = pool_triton.launch_pool_forward(x, prompt, keys, None, clamped, 0, K, False)
    assert torch.equal(got[6], clamped)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    cls, pos = torch.randn(1, 1, D), torch.randn(1, 1 + K * LP + N, D)
    assembled = assemble_triton.launch_assemble(x, prompt, bad, cls, pos)
    assert torch.equal(assembled, assemble_triton.launch_assemble(x, prompt, clamped, cls, pos))
    grad = torch.randn_like(assembled)
    assert torch.equal(assemble_triton.launch_prompt_grad(grad, bad, M, LP),
                       assemble_triton.launch_prompt_grad(grad, clamped, M, LP))
