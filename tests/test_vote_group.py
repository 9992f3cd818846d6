"""The global batch vote (docs/behaviour.md §9): ``FusedPromptPool(vote_group=...)`` on 2 gloo processes.

One spawn of 2 CPU processes (``init_method=file://`` in tmp_path) runs every scenario on every backend
available on the CPU and saves what each rank computed; the parent compares it with one process:

- the global vote on 2 ranks equals the 1-process vote on the concatenated batch, for random inputs,
  with a selection frequency (§8), and for hand-made queries whose global counts tie at the K-th place
  (lower id first);
- the per-rank vote (``vote_group=None``) equals the vote of each rank's half alone (today's behaviour);
- where the local and the global vote choose the same set (both ranks hold the same rows), outputs and
  gradients of the global path equal the local path's bit for bit;
- ``torch.compile(fullgraph=True)`` (Dynamo, eager backend) traces the functional collective.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from l2p_fast import FusedPromptPool
from l2p_fast.testing import backend_skip_reason

BACKENDS = tuple(b for b in ("reference", "cpu", "triton") if backend_skip_reason(b, "cpu") is None)
B_LOCAL, N, D, M, K, LP = 3, 4, 8, 6, 2, 2
FREQUENCY = torch.tensor([0.5, 0.0, 0.25, 0.0, 0.25, 0.0])  # diversified selection (docs/behaviour.md §8)


def make_pool(backend: str, vote_group: object = None, embedding_key: str = "mean") -> FusedPromptPool:
    """The same seeded pool in every process."""
    torch.manual_seed(0)
    pool = FusedPromptPool(length=LP, embed_dim=D, embedding_key=embedding_key, prompt_pool=True, prompt_key=True,
                           pool_size=M, top_k=K, batchwise_prompt=True, backend=backend, vote_group=vote_group)
    with torch.no_grad():
        pool.prompt.normal_()
        pool.prompt_key.normal_()
    return pool


def random_batch(seed: int) -> torch.Tensor:
    """The global batch (2·B_LOCAL, N, D) of a scenario: rank r takes rows r·B_LOCAL … (r+1)·B_LOCAL − 1."""
    return torch.randn(2 * B_LOCAL, N, D, generator=torch.Generator().manual_seed(seed))


def tied_cls_features() -> torch.Tensor:
    """Queries (4, D) for keys = the first M unit vectors: row i's top-2 is (a_i, b_i) exactly, from
    q = e_a + 0.5·e_b. Rank 0 holds (2, 4), (2, 3); rank 1 holds (4, 1), (3, 2). Global counts
    [0, 1, 3, 2, 2, 0]: ids 3 and 4 tie at the K-th place, the lower id wins: (2, 3). Alone, rank 0
    votes (2, 3) and rank 1 (counts [0, 1, 1, 1, 1, 0]) votes (1, 2)."""
    pairs = ((2, 4), (2, 3), (4, 1), (3, 2))
    q = torch.zeros(len(pairs), D)
    for row, (a, b) in enumerate(pairs):
        q[row, a], q[row, b] = 1.0, 0.5
    return q


def run_pool(pool: FusedPromptPool, x: torch.Tensor, cls: torch.Tensor | None = None) -> dict:
    """Forward + backward of a fixed loss; returns the outputs and gradients (detached)."""
    x = x.clone().requires_grad_(True)
    pool.zero_grad(set_to_none=True)
    out = pool(x, cls_features=cls)
    gen = torch.Generator().manual_seed(1)
    loss = (out["prompted_embedding"] * torch.randn(out["prompted_embedding"].shape, generator=gen)).sum()
    loss = loss + 0.7 * out["reduce_sim"] + (out["similarity"] * 0.3).sum()
    loss.backward()
    result = {key: value.detach().clone() for key, value in out.items() if isinstance(value, torch.Tensor)}
    result.update(grad_x=x.grad.clone(), grad_prompt=pool.prompt.grad.clone(), grad_key=pool.prompt_key.grad.clone())
    return result


def worker(rank: int, world: int, init_file: str, out_dir: str, backends: tuple[str, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for backend in backends:
            x = random_batch(seed=3)[rows]
            results[backend, "global"] = run_pool(make_pool(backend, "world"), x)
            results[backend, "group"] = run_pool(make_pool(backend, dist.new_group([0, 1])), x)
            results[backend, "local"] = run_pool(make_pool(backend, None), x)
            diversified = make_pool(backend, "world")
            diversified.set_prompt_frequency(FREQUENCY)
            results[backend, "frequency"] = run_pool(diversified, x)
            same = random_batch(seed=5)[:B_LOCAL]  # both ranks hold the same rows: the same chosen set
            results[backend, "same_global"] = run_pool(make_pool(backend, "world"), same)
            results[backend, "same_local"] = run_pool(make_pool(backend, None), same)
            tied_pool = make_pool(backend, "world", embedding_key="cls")
            with torch.no_grad():
                tied_pool.prompt_key.copy_(torch.eye(M, D))
            cls = tied_cls_features()[rank * 2:(rank + 1) * 2]
            results[backend, "tied"] = run_pool(tied_pool, torch.randn(2, N, D), cls)
            tied_pool.vote_group = None
            results[backend, "tied_local"] = run_pool(tied_pool, torch.randn(2, N, D), cls)
            # rank 1 holds no rows (a global batch smaller than the world): it still joins the collective
            share = random_batch(seed=7)[: B_LOCAL if rank == 0 else 0]
            with torch.no_grad():
                out = make_pool(backend, "world")(share)
            results[backend, "empty"] = {k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)}
        for backend in [b for b in ("reference", "cpu") if b in backends]:
            pool = make_pool(backend, "world")
            compiled = torch.compile(pool, fullgraph=True, backend="eager")
            x = random_batch(seed=3)[rows]
            results[backend, "compiled"] = compiled(x)["prompt_idx"].clone()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    folder = tmp_path_factory.mktemp("vote_group")
    mp.spawn(worker, args=(2, str(folder / "init"), str(folder), BACKENDS), nprocs=2, join=True)
    return tuple(torch.load(folder / f"rank{r}.pt") for r in range(2))


def one_process(backend: str, x: torch.Tensor, **kwargs: object) -> dict:
    return run_pool(make_pool(backend, None, **kwargs), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_vote_equals_one_process_on_the_concatenated_batch(ranks, backend: str) -> None:
    whole = one_process(backend, random_batch(seed=3))
    for rank, result in enumerate(ranks):
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for scenario in ("global", "group"):
            assert torch.equal(result[backend, scenario]["prompt_idx"], whole["prompt_idx"][rows]), scenario
            assert torch.equal(result[backend, scenario]["prompted_embedding"], whole["prompted_embedding"][rows])


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_vote_with_a_frequency(ranks, backend: str) -> None:
    pool = make_pool(backend, None)
    pool.set_prompt_frequency(FREQUENCY)
    whole = run_pool(pool, random_batch(seed=3))
    assert not torch.equal(whole["prompt_idx"], one_process(backend, random_batch(seed=3))["prompt_idx"])
    for rank, result in enumerate(ranks):
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        assert torch.equal(result[backend, "frequency"]["prompt_idx"], whole["prompt_idx"][rows])


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_vote_breaks_tied_counts_by_lower_id(ranks, backend: str) -> None:
    for result in ranks:
        assert result[backend, "tied"]["prompt_idx"].tolist() == [[2, 3], [2, 3]]
    assert ranks[0][backend, "tied_local"]["prompt_idx"].tolist() == [[2, 3], [2, 3]]
    assert ranks[1][backend, "tied_local"]["prompt_idx"].tolist() == [[1, 2], [1, 2]]
    pool = make_pool(backend, None, embedding_key="cls")
    with torch.no_grad():
        pool.prompt_key.copy_(torch.eye(M, D))
    whole = run_pool(pool, torch.randn(4, N, D), tied_cls_features())
    assert whole["prompt_idx"].tolist() == [[2, 3]] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_rank_vote_is_the_vote_of_each_half(ranks, backend: str) -> None:
    x = random_batch(seed=3)
    differs = False
    for rank, result in enumerate(ranks):
        half = one_process(backend, x[rank * B_LOCAL:(rank + 1) * B_LOCAL])
        for key, value in half.items():
            assert torch.equal(result[backend, "local"][key], value), key
        differs |= not torch.equal(result[backend, "local"]["prompt_idx"], result[backend, "global"]["prompt_idx"])
    assert differs, "the scenario must make a per-rank vote differ from the global one"


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_path_outputs_and_gradients_equal_the_local_path(ranks, backend: str) -> None:
    for result in ranks:
        glob, local = result[backend, "same_global"], result[backend, "same_local"]
        assert glob.keys() == local.keys()
        for key in glob:
            assert torch.equal(glob[key], local[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_share_joins_the_vote(ranks, backend: str) -> None:
    alone = one_process(backend, random_batch(seed=7)[:B_LOCAL])
    assert torch.equal(ranks[0][backend, "empty"]["prompt_idx"], alone["prompt_idx"])
    assert torch.equal(ranks[0][backend, "empty"]["prompted_embedding"], alone["prompted_embedding"])
    assert ranks[1][backend, "empty"]["prompt_idx"].shape == (0, K)
    assert ranks[1][backend, "empty"]["prompted_embedding"].shape == (0, K * LP + N, D)


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in BACKENDS])
def test_compiled_global_vote(ranks, backend: str) -> None:
    for result in ranks:
        assert torch.equal(result[backend, "compiled"], result[backend, "global"]["prompt_idx"])


def test_vote_group_is_checked() -> None:
    with pytest.raises(ValueError, match="vote_group: expected None, 'world' or a torch.distributed ProcessGroup"):
        make_pool("reference", "everyone")
    pool = make_pool("reference")
    with pytest.raises(ValueError, match="vote_group"):
        pool.vote_group = 3
    pool.vote_group = "world"
    assert pool.vote_group == "world"


def test_no_collective_without_the_vote() -> None:
    """vote_group only acts on the batch vote without a mask: otherwise no collective runs (none is set up here)."""
    assert not dist.is_initialized()
    x = random_batch(seed=9)
    pool = make_pool("reference", "world")
    mask = torch.tensor([[1, 4]] * len(x))
    assert torch.equal(pool(x, prompt_mask=mask)["prompt_idx"], mask)
    pool.batchwise_prompt = False
    local = make_pool("reference", None)
    local.batchwise_prompt = False
    assert torch.equal(pool(x)["prompt_idx"], local(x)["prompt_idx"])
    with pytest.raises(ValueError, match="x_embed: expected B >= 1"):
        pool(x[:0])  # an empty batch is accepted only where it joins the global vote
