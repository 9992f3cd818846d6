"""Fuzz test of the prompt pool (issue 16): seeded, bounded in time, every CPU backend against the reference.

Random shapes (B, N, D, M, K, Lp from 1 up), input dtypes, non-contiguous views, query modes, masks and batch
votes, with NaN / ±inf placed in x_embed, cls_features or the keys; then bad values (wrong shapes, dtypes and
devices, out-of-range top_k and ids). Each backend must give the reference's result (ids exactly, copies
bit-exactly, similarity-derived values within ``l2p_fast.testing.TOLERANCES``, NaN at the same places) or raise
the same error type with the same message; ids always lie in [0, M).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
import torch

from l2p_fast import FusedPromptPool
from l2p_fast.testing import TOLERANCES, backend_skip_reason

SEED = 20261207
VALID_CASES = 60
BAD_CASES = 60
TIME_BUDGET_S = 25.0  # per test; the case count is the normal bound, the clock only a guard on a slow machine
MIN_CASES = 10
FUSED = tuple(name for name in ("cpu", "triton") if backend_skip_reason(name, "cpu") is None)
INPUT_DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64)
KEYS = ("mean", "max", "mean_max", "cls")

pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend runs on CPU tensors here (cpu, triton)")


def _pools(config: dict, param_dtype: torch.dtype, seed: int) -> dict[str, FusedPromptPool]:
    """One module per backend with the same parameters (the reference's copy is the truth)."""
    pools = {}
    for backend in ("reference", *FUSED):
        torch.manual_seed(seed)
        pools[backend] = FusedPromptPool(**config, backend=backend).to(param_dtype)
    return pools


def _view(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values as a non-contiguous view (half the time)."""
    if rng.random() < 0.5 or t.dim() < 2:
        return t
    if rng.random() < 0.5:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _poison(t: torch.Tensor, rng: random.Random) -> None:
    if rng.random() < 0.7:
        return
    flat = t.view(-1) if t.is_contiguous() else None
    if flat is None or flat.numel() == 0:
        return
    for _ in range(rng.randint(1, 3)):
        flat[rng.randrange(flat.numel())] = rng.choice((float("nan"), float("inf"), float("-inf")))


def _random_case(rng: random.Random) -> tuple[dict, dict, torch.dtype]:
    batch, tokens, width = rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 17)
    pool_size, length = rng.randint(1, 7), rng.randint(1, 3)
    top_k = rng.randint(1, pool_size)
    key = rng.choice(KEYS)
    config = {"length": length, "embed_dim": width, "embedding_key": key, "prompt_pool": True,
              "prompt_key": rng.random() < 0.8, "pool_size": pool_size, "top_k": top_k,
              "batchwise_prompt": rng.random() < 0.4}
    dtype = rng.choice(INPUT_DTYPES)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(batch, tokens, width, generator=gen).to(dtype)
    cls = torch.randn(batch, width, generator=gen).to(dtype)
    _poison(x, rng)
    _poison(cls, rng)
    inputs = {"x_embed": _view(x, rng)}
    if key == "cls" and rng.random() < 0.7:
        inputs["cls_features"] = _view(cls, rng)
    if rng.random() < 0.25:
        inputs["prompt_mask"] = torch.randint(0, pool_size, (batch, rng.randint(1, pool_size)), generator=gen)
    return config, inputs, (torch.float64 if dtype == torch.float64 else torch.float32)


def _near_tie(similarity: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether two finite scores of a row are closer than the tolerance (backends may then order them apart)."""
    tol = TOLERANCES[dtype]["atol"] + TOLERANCES[dtype]["rtol"]
    s = similarity.detach().double().sort(dim=1).values
    gaps = (s[:, 1:] - s[:, :-1]).abs()
    return bool(((gaps <= 4 * tol) & torch.isfinite(gaps)).any())


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    tol = {"rtol": 0.0, "atol": 0.0} if exact else TOLERANCES[want.dtype]
    torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{name}: {m}", **tol)


def _run_cases(count: int, make: Callable[[random.Random], None], seed: int) -> int:
    rng = random.Random(seed)
    start, done = time.perf_counter(), 0
    for _ in range(count):
        if time.perf_counter() - start > TIME_BUDGET_S:
            break
        make(rng)
        done += 1
    assert done >= MIN_CASES, f"only {done} cases ran within {TIME_BUDGET_S} s"
    return done


def test_random_valid_inputs_match_the_reference() -> None:
    compared = []

    def one(rng: random.Random) -> None:
        config, inputs, param_dtype = _random_case(rng)
        pools = _pools(config, param_dtype, seed=rng.randrange(2**31))
        if rng.random() < 0.2:  # a non-finite key
            with torch.no_grad():
                for pool in pools.values():
                    target = pool.prompt_key if config["prompt_key"] else pool.prompt
                    target.view(-1)[0] = float("nan")
        case = f"{config} {({k: (tuple(v.shape), v.dtype, v.is_contiguous()) for k, v in inputs.items()})}"
        with torch.no_grad():
            ref = pools["reference"](**inputs)
            for backend in FUSED:
                out = pools[backend](**inputs)
                ids = out["prompt_idx"]
                assert bool(((ids >= 0) & (ids < config["pool_size"])).all()), f"{backend}: ids out of range, {case}"
                if not torch.equal(ids, ref["prompt_idx"]):
                    assert _near_tie(ref["similarity"], ref["similarity"].dtype), (
                        f"{backend}: ids {ids.tolist()} != reference {ref['prompt_idx'].tolist()}, {case}")
                    continue  # a near tie ordered apart: the rest follows from other ids
                for key in ("prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim"):
                    _compare(f"{backend} {key} {case}", out[key], ref[key], exact=False)
                _compare(f"{backend} prompted_embedding {case}", out["prompted_embedding"], ref["prompted_embedding"],
                         exact=True)
                assert out["total_prompt_len"] == ref["total_prompt_len"]
                compared.append(not torch.isfinite(ref["similarity"]).all())

    done = _run_cases(VALID_CASES, one, SEED)
    assert len(compared) >= len(FUSED) * done // 2, "most cases must compare every output (few near ties)"
    assert any(compared) and not all(compared), "the cases must mix finite and non-finite scores"


def _bad_case(rng: random.Random) -> tuple[dict, dict]:
    """A valid configuration with one bad argument."""
    batch, tokens, width, pool_size, top_k = rng.randint(1, 4), rng.randint(1, 6), rng.randint(2, 9), \
        rng.randint(2, 6), 1
    config = {"length": 2, "embed_dim": width, "embedding_key": rng.choice(KEYS), "prompt_pool": True,
              "prompt_key": True, "pool_size": pool_size, "top_k": top_k, "batchwise_prompt": rng.random() < 0.5}
    x = torch.randn(batch, tokens, width)
    inputs: dict = {"x_embed": x}
    kind = rng.choice(("x_2d", "x_width", "x_int", "x_meta", "cls_shape", "cls_int", "mask_float", "mask_bool",
                       "mask_shape", "mask_low", "mask_high", "mask_meta", "x_list", "empty_batch", "empty_tokens"))
    if kind == "x_2d":
        inputs["x_embed"] = x[0]
    elif kind == "x_width":
        inputs["x_embed"] = torch.randn(batch, tokens, width + 1)
    elif kind == "x_int":
        inputs["x_embed"] = torch.randint(0, 5, (batch, tokens, width))
    elif kind == "x_meta":
        inputs["x_embed"] = x.to("meta")
    elif kind == "cls_shape":
        config["embedding_key"] = "cls"
        inputs["cls_features"] = torch.randn(batch + 1, width)
    elif kind == "cls_int":
        config["embedding_key"] = "cls"
        inputs["cls_features"] = torch.ones(batch, width, dtype=torch.int64)
    elif kind == "mask_float":
        inputs["prompt_mask"] = torch.zeros(batch, 1)
    elif kind == "mask_bool":
        inputs["prompt_mask"] = torch.zeros(batch, 1, dtype=torch.bool)
    elif kind == "mask_shape":
        inputs["prompt_mask"] = torch.zeros(batch + 1, 1, dtype=torch.int64)
    elif kind == "mask_low":
        inputs["prompt_mask"] = torch.full((batch, 2), -1, dtype=torch.int64)
    elif kind == "mask_high":
        inputs["prompt_mask"] = torch.full((batch, 1), pool_size, dtype=torch.int64)
    elif kind == "mask_meta":
        inputs["prompt_mask"] = torch.zeros(batch, 1, dtype=torch.int64, device="meta")
    elif kind == "x_list":
        inputs["x_embed"] = x.tolist()
    elif kind == "empty_batch":
        inputs["x_embed"] = x[:0]
    else:
        inputs["x_embed"] = x[:, :0]
    return config, inputs


def _outcome(run: Callable[[], object]) -> tuple[str, str]:
    try:
        run()
    except Exception as error:  # noqa: BLE001 - the error itself is what is compared
        return type(error).__name__, str(error)
    return "ok", ""


def test_bad_inputs_raise_the_reference_error() -> None:
    def one(rng: random.Random) -> None:
        config, inputs = _bad_case(rng)
        pools = _pools(config, torch.float32, seed=rng.randrange(2**31))
        want = _outcome(lambda: pools["reference"](**inputs))
        assert want[0] in ("ValueError", "TypeError"), f"reference: {want} for {config} {inputs.keys()}"
        for backend in FUSED:
            assert _outcome(lambda b=backend: pools[b](**inputs)) == want, f"{backend}, {config}"

    _run_cases(BAD_CASES, one, SEED + 1)


@pytest.mark.parametrize("top_k", [0, -1, 8, 2.0, None, True])
def test_bad_top_k_is_refused_by_every_backend_alike(top_k: object) -> None:
    outcomes = {backend: _outcome(lambda b=backend: FusedPromptPool(
        length=2, embed_dim=4, prompt_pool=True, prompt_key=True, pool_size=7, top_k=top_k, backend=b)(
        torch.randn(2, 3, 4))) for backend in ("reference", *FUSED)}
    assert outcomes["reference"][0] in ("ValueError", "TypeError"), outcomes
    assert len(set(outcomes.values())) == 1, outcomes
