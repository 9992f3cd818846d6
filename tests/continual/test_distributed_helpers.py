"""The helpers of l2p_fast.continual.distributed: one process (identities, env parsing) and 2 spawned gloo processes."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from l2p_fast.continual import distributed
from l2p_fast.continual.batching import Pool
from l2p_fast.continual.loading import load_batches


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_bounds_cover_every_item_once(world):
    for size in range(12):
        bounds = [distributed.shard_bounds(size, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous, in rank order
        lengths = [end - start for start, end in bounds]
        assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_shard_bounds_bad_rank():
    with pytest.raises(ValueError, match=r"index: expected a rank in \[0, 2\), got 2"):
        distributed.shard_bounds(5, 2, 2)


def test_one_process_is_the_identity():
    assert not distributed.active()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    items = torch.arange(7)
    part, start = distributed.shard(items)
    assert torch.equal(part, items) and start == 0
    counts = torch.tensor([3, 4])
    assert distributed.all_reduce_(counts) is counts and counts.tolist() == [3, 4]
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    a.grad = torch.full((2,), 0.5)
    extra = torch.tensor([1.5])
    assert distributed.all_reduce_grads([a, b], extra) is extra
    assert a.grad.tolist() == [0.5, 0.5] and b.grad is None
    assert distributed.from_main(lambda: 41 + 1) == 42
    with pytest.raises(KeyError, match="boom"):
        distributed.from_main(lambda: {}["boom"])
    distributed.barrier()
    assert distributed.describe() == "1 process"
    with pytest.raises(RuntimeError, match="not a collective"):  # errors pass through when no group runs
        with distributed.collective_errors("testing"):
            raise RuntimeError("not a collective; connection words do not matter without a group")


def test_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer in the environment, got 'two'"):
        distributed.launched()
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_seconds() == 12.5
    for bad in ("0", "-3", "inf", "nan", "soon"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"{distributed.TIMEOUT_ENV}: expected a finite number of seconds > 0"):
            distributed.timeout_seconds()
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for(torch.device("cuda")) == "nccl"


def test_session(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.session("cpu"):  # not launched: nothing started
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"the launcher's variables \['RANK', 'LOCAL_RANK', 'MASTER_ADDR'"):
        with distributed.session("cpu"):
            pass
    assert not torch.distributed.is_initialized()


def test_use_global_vote_needs_a_pool_that_can(tmp_path):
    class OldPool(nn.Module):  # votes per batch, has no vote_group
        def __init__(self) -> None:
            super().__init__()
            self.batchwise_prompt = True
            self.prompt = nn.Parameter(torch.zeros(2, 1, 4))

    distributed.init("cpu", init_method=f"file://{tmp_path / 'init'}", world_size=1, rank=0)
    try:
        with pytest.raises(RuntimeError, match=r"batchwise_prompt: .* \['OldPool'\] has no vote_group"):
            distributed.use_global_vote(nn.Sequential(OldPool()))
        pool = OldPool()
        pool.vote_group = None
        pool.batchwise_prompt = False  # no vote: left alone
        assert distributed.use_global_vote(nn.Sequential(pool)) == [] and pool.vote_group is None
        pool.batchwise_prompt = True
        assert distributed.use_global_vote(nn.Sequential(pool)) == [pool]
        assert pool.vote_group is torch.distributed.group.WORLD
        from l2p_fast import FusedPromptPool
        from l2p_fast.dualprompt.eprompt import FusedEPrompt

        fused = FusedPromptPool(length=2, embed_dim=8, prompt_pool=True, prompt_key=True, pool_size=4, top_k=2,
                                batchwise_prompt=True)
        assert distributed.use_global_vote(nn.Sequential(fused)) == [fused]
        assert fused.vote_group is torch.distributed.group.WORLD
        eprompt = FusedEPrompt(length=2, embed_dim=8, prompt_pool=True, prompt_key=True, pool_size=4, top_k=1,
                               batchwise_prompt=True)
        if not hasattr(eprompt, "vote_group"):  # DualPrompt's E-prompt selection votes per process only
            with pytest.raises(RuntimeError, match="FusedEPrompt"):
                distributed.use_global_vote(nn.Sequential(eprompt))
        with pytest.raises(RuntimeError, match="already initialised"):
            distributed.init("cpu", init_method=f"file://{tmp_path / 'again'}", world_size=1, rank=0)
    finally:
        torch.distributed.destroy_process_group()


def test_load_batches_gives_none_for_an_empty_share():
    pool = Pool(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), tokens=[[1, 2], [3], [4, 5, 6]],
                lengths=torch.tensor([2, 1, 3]))
    got = list(load_batches(pool, [torch.tensor([0, 2]), torch.tensor([], dtype=torch.long)], [None, None],
                            torch.device("cpu")))
    assert got[0]["input_ids"].shape == (2, 3) and got[1] is None


@pytest.mark.parametrize("workers", [0, 1])
def test_load_batches_of_images_with_an_empty_share(workers):
    from torch.utils.data import TensorDataset

    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).view(5, 3, 2, 2)
    pool = Pool(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                sources=[TensorDataset(images, torch.zeros(5))], offsets=[0])
    batches = [torch.tensor([4, 1]), torch.tensor([], dtype=torch.long), torch.tensor([2])]
    got = list(load_batches(pool, batches, [None] * 3, torch.device("cpu"), num_workers=workers))
    assert torch.equal(got[0], images[[4, 1]]) and got[1] is None and torch.equal(got[2], images[[2]])


def _helpers_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init("cpu", init_method=f"file://{init_file}", world_size=2, rank=rank, timeout=30)
    record: dict = {"describe": distributed.describe()}
    record["shard"] = distributed.shard(torch.arange(5))[0].tolist()
    # gradients: `a` on both ranks, `b` on rank 1 only, `c` on none; extra summed
    a, b, c = (nn.Parameter(torch.zeros(n)) for n in (2, 3, 1))
    a.grad = torch.full((2,), float(rank + 1))
    if rank == 1:
        b.grad = torch.ones(3)
    extra = distributed.all_reduce_grads([a, b, c], torch.tensor([rank + 0.5, 1.0]))
    record["grads"] = (a.grad.tolist(), b.grad.tolist(), c.grad)
    record["extra"] = extra.tolist()
    counts = distributed.all_reduce_(torch.tensor([rank, 1]))
    record["counts"] = counts.tolist()
    record["main"] = distributed.from_main(lambda: f"decided by rank {distributed.rank()}")
    try:
        distributed.from_main(lambda: (_ for _ in ()).throw(ValueError("output: refused on rank 0")))
    except ValueError as error:
        record["refused"] = str(error)
    torch.save(record, Path(out) / f"rank{rank}.pt")
    # a process that hangs (alive, silent): the other fails when the collective times out (a 4 s group)
    short = torch.distributed.new_group(timeout=timedelta(seconds=4))
    hung = Path(out) / "hung.pt"
    if rank == 1:
        deadline = time.monotonic() + 60
        while not hung.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return  # then leaves without the last collective: rank 0 must fail with RankError at once, not hang
    started = time.monotonic()
    try:
        with distributed.collective_errors("waiting for a silent process"):
            torch.distributed.barrier(group=short)
    except distributed.RankError as error:
        torch.save({"error": str(error), "seconds": time.monotonic() - started}, hung)
    started = time.monotonic()
    try:
        distributed.barrier("waiting at the last barrier")
    except distributed.RankError as error:
        torch.save({"error": str(error), "seconds": time.monotonic() - started}, Path(out) / "lost.pt")


def test_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_helpers_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    records = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert records[0]["shard"] == [0, 1, 2] and records[1]["shard"] == [3, 4]
    for record in records:
        assert record["describe"].startswith("2 processes") and "gloo" in record["describe"]
        assert record["grads"] == ([3.0, 3.0], [1.0, 1.0, 1.0], None)
        assert record["extra"] == [2.0, 2.0]
        assert record["counts"] == [1, 2]
        assert record["main"] == "decided by rank 0"
        assert record["refused"] == "output: refused on rank 0"
    hung = torch.load(tmp_path / "hung.pt", weights_only=False)
    assert "rank 0 of 2 lost the other processes while waiting for a silent process" in hung["error"]
    assert 3.5 < hung["seconds"] < 20  # the 4 s timeout, not the 60 s the silent process waits
    lost = torch.load(tmp_path / "lost.pt", weights_only=False)
    assert "rank 0 of 2 lost the other processes while waiting at the last barrier" in lost["error"]
    assert "did not answer within 30 s" in lost["error"]  # the group's own timeout
    assert "--resume" in lost["error"] and lost["seconds"] < 20  # a process that left: seen before the timeout
