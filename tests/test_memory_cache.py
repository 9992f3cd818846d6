"""The reuse cache of large CPU outputs (l2p_fast.memory, csrc/cpu/output_cache.cpp)."""

import os
import subprocess
import sys

import pytest
import torch

import l2p_fast
from l2p_fast import FusedPromptPool, _native
from l2p_fast.testing import peak_memory_bytes

pytestmark = pytest.mark.skipif(not _native.is_built(), reason=f"native extension missing: {_native.LOAD_ERROR}")

# (B, K·Lp + N, D) fp32 = 4 · 8 · (2·3 + 40) · 256 bytes ≈ 377 KB: above the 256 KiB threshold
B, N, D, M, K, LP = 8, 40, 256, 6, 2, 3


def _pools() -> tuple[FusedPromptPool, FusedPromptPool]:
    torch.manual_seed(0)
    ours = FusedPromptPool(length=LP, embed_dim=D, embedding_key="cls", prompt_pool=True, prompt_key=True,
                           pool_size=M, top_k=K, batchwise_prompt=True, backend="cpu")  # fmt: skip
    ref = FusedPromptPool(length=LP, embed_dim=D, embedding_key="cls", prompt_pool=True, prompt_key=True,
                          pool_size=M, top_k=K, batchwise_prompt=True, backend="reference")  # fmt: skip
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=gen), torch.randn(B, D, generator=gen)


@pytest.fixture(autouse=True)
def fresh_cache():
    limit = l2p_fast.cpu_cache_stats()["limit_bytes"]
    l2p_fast.empty_cpu_cache()
    yield
    l2p_fast.set_cpu_cache_limit(limit / 2**20)


def test_released_output_is_reused_and_values_stay_exact() -> None:
    ours, ref = _pools()
    x, cls = _inputs(1)
    first = ours(x, cls_features=cls)["prompted_embedding"]
    ptr = first.data_ptr()
    before = l2p_fast.cpu_cache_stats()
    assert before["in_use_bytes"] >= first.numel() * 4
    del first
    after_release = l2p_fast.cpu_cache_stats()
    assert after_release["cached_bytes"] >= before["in_use_bytes"] and after_release["cached_blocks"] >= 1
    for seed in (2, 3):  # new values in a reused block: nothing of the old output shows through
        x, cls = _inputs(seed)
        out = ours(x, cls_features=cls)["prompted_embedding"]
        assert torch.equal(out, ref(x, cls_features=cls)["prompted_embedding"])
        del out
    stats = l2p_fast.cpu_cache_stats()
    assert stats["hits"] >= before["hits"] + 2
    x, cls = _inputs(4)
    assert ours(x, cls_features=cls)["prompted_embedding"].data_ptr() == ptr  # the same block again


def test_live_outputs_never_share_a_block() -> None:
    ours, _ = _pools()
    outs = [ours(*_inputs(seed)[:1], cls_features=_inputs(seed)[1])["prompted_embedding"] for seed in range(4)]
    assert len({out.data_ptr() for out in outs}) == 4
    expected = [out.clone() for out in outs]
    outs[0].add_(1.0)  # writing one output leaves the others alone
    for out, copy in zip(outs[1:], expected[1:], strict=True):
        assert torch.equal(out, copy)


def test_limit_zero_turns_the_cache_off_and_clear_frees() -> None:
    ours, _ = _pools()
    x, cls = _inputs(5)
    del ours(x, cls_features=cls)["prompted_embedding"]
    assert l2p_fast.cpu_cache_stats()["cached_bytes"] > 0
    l2p_fast.empty_cpu_cache()
    assert l2p_fast.cpu_cache_stats()["cached_bytes"] == 0
    l2p_fast.set_cpu_cache_limit(0)
    hits, misses = l2p_fast.cpu_cache_stats()["hits"], l2p_fast.cpu_cache_stats()["misses"]
    for _ in range(2):
        del ours(x, cls_features=cls)["prompted_embedding"]
    stats = l2p_fast.cpu_cache_stats()
    assert (stats["hits"], stats["misses"], stats["cached_bytes"]) == (hits, misses, 0)


def test_limit_bounds_unused_bytes() -> None:
    ours, _ = _pools()
    block = B * (K * LP + N) * D * 4
    l2p_fast.set_cpu_cache_limit(1.5 * block / 2**20)  # room for one block, not two
    x, cls = _inputs(6)
    a, b = ours(x, cls_features=cls)["prompted_embedding"], ours(x, cls_features=cls)["prompted_embedding"]
    del a, b
    stats = l2p_fast.cpu_cache_stats()
    assert stats["cached_blocks"] == 1 and stats["cached_bytes"] <= 1.5 * block


def test_cached_tensor_behaves_like_any_tensor() -> None:
    ours, _ = _pools()
    x, cls = _inputs(7)
    with torch.no_grad():
        out = ours(x, cls_features=cls)["prompted_embedding"]
    copy = out.clone()
    out.resize_(2 * out.numel())  # storage growth goes through the same allocator
    assert torch.equal(out[: copy.numel()].view_as(copy), copy)
    out[copy.numel() :] = 0.5  # the grown tail is uninitialised (may hold NaN bit patterns)
    assert torch.equal(torch.load(_roundtrip(out), weights_only=True), out)


def _roundtrip(t: torch.Tensor):
    import io

    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    return buffer


def test_profiler_sees_cached_allocations() -> None:
    ours, _ = _pools()
    x, cls = _inputs(8)
    peak = peak_memory_bytes(lambda: ours(x, cls_features=cls))
    assert peak is not None and peak >= B * (K * LP + N) * D * 4


def test_leaf_token_grad_is_contiguous_and_exact() -> None:
    ours, ref = _pools()
    x, cls = _inputs(9)
    grad = torch.randn(B, K * LP + N, D)
    for pool in (ours, ref):
        leaf = x.clone().requires_grad_(True)
        pool(leaf, cls_features=cls)["prompted_embedding"].backward(grad)
        assert leaf.grad.is_contiguous() and torch.equal(leaf.grad, grad[:, K * LP :])
    # a non-leaf x_embed gets the token slice as it is, through autograd
    base = x.clone().requires_grad_(True)
    ours(base * 1.0, cls_features=cls)["prompted_embedding"].backward(grad)
    assert torch.equal(base.grad, grad[:, K * LP :])


@pytest.mark.parametrize("bad", [-1, float("inf"), float("-inf"), float("nan"), 1e30, 2**43, True, "8", None])
def test_bad_limits_raise_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"megabytes: expected a finite number in \[0, 2\*\*43\), got "):
        l2p_fast.set_cpu_cache_limit(bad)


def test_largest_limit_is_accepted() -> None:
    l2p_fast.set_cpu_cache_limit(2**43 - 1)
    assert l2p_fast.cpu_cache_stats()["limit_bytes"] == (2**43 - 1) * 2**20


@pytest.mark.parametrize("value", ["lots", "99999999999999999999", str(2**43)])  # 2**43 MB overflows int64 bytes
def test_bad_env_limits_raise_a_clear_error(value: str) -> None:
    code = "import l2p_fast, torch; l2p_fast.cpu_cache_stats()"
    env = dict(os.environ, L2P_FAST_CPU_CACHE_MB=value)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert f"L2P_FAST_CPU_CACHE_MB: expected a non-negative integer (megabytes) of at most {2**43 - 1}, got '{value}'" in run.stderr


@pytest.mark.parametrize("value", ["0", str(2**43 - 1)])  # off, and the largest limit
def test_env_limits_in_range_are_used(value: str) -> None:
    env = dict(os.environ, L2P_FAST_CPU_CACHE_MB=value)
    code = f"import l2p_fast; assert l2p_fast.cpu_cache_stats()['limit_bytes'] == {int(value) * 2**20}"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_large_blocks_are_mapped_aligned_reused_and_unmapped() -> None:
    """Outputs of 2 MiB and more get directly mapped, 2 MiB-aligned blocks (huge-page candidates); they are
    reused with exact values, and dropping them (clear, limit) unmaps them without disturbing live outputs."""
    torch.manual_seed(0)
    pools = {backend: FusedPromptPool(length=LP, embed_dim=768, embedding_key="cls", prompt_pool=True, prompt_key=True,
                                      pool_size=M, top_k=K, batchwise_prompt=True, backend=backend)
             for backend in ("cpu", "reference")}  # fmt: skip
    pools["reference"].load_state_dict(pools["cpu"].state_dict())
    gen = torch.Generator().manual_seed(7)
    x, cls = torch.randn(16, 50, 768, generator=gen), torch.randn(16, 768, generator=gen)  # output ≈ 2.75 MB
    expected = pools["reference"](x, cls_features=cls)["prompted_embedding"]
    live = pools["cpu"](x, cls_features=cls)["prompted_embedding"]
    first = pools["cpu"](x, cls_features=cls)["prompted_embedding"]
    assert live.data_ptr() % (2 << 20) == 0 and first.data_ptr() % (2 << 20) == 0
    ptr = first.data_ptr()
    del first
    again = pools["cpu"](x, cls_features=cls)["prompted_embedding"]
    assert again.data_ptr() == ptr and torch.equal(again, expected)
    del again
    l2p_fast.empty_cpu_cache()  # unmaps the free block
    assert l2p_fast.cpu_cache_stats()["cached_bytes"] == 0
    l2p_fast.set_cpu_cache_limit(1)  # 1 MB: a released large block is unmapped at once
    del live
    assert l2p_fast.cpu_cache_stats()["cached_bytes"] == 0
    fresh = pools["cpu"](x * 2, cls_features=cls)["prompted_embedding"]
    assert torch.equal(fresh, pools["reference"](x * 2, cls_features=cls)["prompted_embedding"])
