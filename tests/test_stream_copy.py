"""Streaming (non-temporal) stores for CPU outputs larger than the cache (csrc/cpu/stream_copy.cpp):
the written bytes are the same as with regular stores, in every dtype, for unaligned rows and heads, and the
threshold's API checks its argument."""

import os

import pytest
import torch

import l2p_fast
from l2p_fast import _native
from l2p_fast.testing import PoolCase, clone_pool, forward_and_grads, make_inputs, make_pool, random_cases

pytestmark = pytest.mark.skipif(not _native.is_built(), reason=f"native extension missing: {_native.LOAD_ERROR}")

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def default_threshold():
    yield
    l2p_fast.set_cpu_stream_threshold(None)


def _run(case: PoolCase, seed: int, megabytes: float) -> tuple[dict, dict]:
    l2p_fast.set_cpu_stream_threshold(megabytes)
    pool = clone_pool(make_pool(case, seed=seed), "cpu")
    out, grads, _ = forward_and_grads(pool, make_inputs(case, seed=seed))
    return out, grads


def _assert_identical(got: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(6))
def test_streamed_outputs_and_grads_equal_regular_stores(dtype: torch.dtype, index: int) -> None:
    # random cases: odd widths (rows of 2·33 bytes in bf16: unaligned heads and tails), transposed x, every key
    case = random_cases(6, seed=4242 + DTYPES.index(dtype), dtypes=(dtype,))[index]
    streamed, streamed_grads = _run(case, index, 0)  # every output streams
    regular, regular_grads = _run(case, index, 2**30)  # none does
    _assert_identical(streamed, regular)
    _assert_identical(streamed_grads, regular_grads)
    expected = make_pool(case, seed=index)(**make_inputs(case, seed=index))["prompted_embedding"]
    if case.use_mask or not case.duplicate_keys:  # the reference's BLAS may break exact key ties either way
        assert torch.equal(streamed["prompted_embedding"], expected)


@pytest.mark.parametrize("width", [1, 5, 16, 67])
def test_streamed_token_gradient_of_the_op_equals_regular_stores(width: int) -> None:
    """pool_backward asked for grad x_embed with cls_features as the query: the token slice, copied."""
    batch, tokens, pool_size, top_k, length = 3, 11, 4, 2, 3
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(batch, tokens, width, generator=gen)
    cls = torch.randn(batch, width, generator=gen)
    prompt = torch.randn(pool_size, length, width, generator=gen)
    keys = torch.randn(pool_size, width, generator=gen)
    grad = torch.randn(batch, top_k * length + tokens, width, generator=gen)
    results = []
    for megabytes in (0, 2**30):
        l2p_fast.set_cpu_stream_threshold(megabytes)
        out = torch.ops.l2p_fast.pool_forward(x, cls, prompt, keys, None, 3, top_k, False)
        grads = torch.ops.l2p_fast.pool_backward(grad, None, None, None, None, torch.ones(()), out[1], out[2],
                                                 out[8], out[9], out[4], out[7], 3, length, x.dtype, cls.dtype,
                                                 prompt.dtype, keys.dtype, True, True, True, True)  # fmt: skip
        results.append((out, grads))
    (out_s, grads_s), (out_r, grads_r) = results
    assert all(torch.equal(a, b) for a, b in zip(out_s, out_r, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_s, grads_r, strict=True))
    assert torch.equal(grads_s[0], grad[:, top_k * length :])


def _sysfs_l3_bytes() -> int | None:
    for index in range(8):
        folder = f"/sys/devices/system/cpu/cpu0/cache/index{index}"
        try:
            with open(os.path.join(folder, "level")) as level, open(os.path.join(folder, "size")) as size:
                if level.read().strip() != "3":
                    continue
                text = size.read().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * unit
    return None


def test_threshold_defaults_to_half_the_last_level_cache_and_can_be_moved() -> None:
    l3 = _sysfs_l3_bytes()
    default = l2p_fast.cpu_stream_threshold()
    assert default > 0
    if l3 is not None:
        assert default == l3 // 2
    l2p_fast.set_cpu_stream_threshold(1.5)
    assert l2p_fast.cpu_stream_threshold() == int(1.5 * 2**20)
    l2p_fast.set_cpu_stream_threshold(0)
    assert l2p_fast.cpu_stream_threshold() == 0
    l2p_fast.set_cpu_stream_threshold(None)
    assert l2p_fast.cpu_stream_threshold() == default


@pytest.mark.parametrize("value", [-1, True, "8", float("nan"), 2**41])
def test_threshold_rejects_bad_values(value: object) -> None:
    with pytest.raises(ValueError, match=r"megabytes: expected a number in \[0, 2\*\*40\) or None, got"):
        l2p_fast.set_cpu_stream_threshold(value)
