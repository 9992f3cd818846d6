"""The global batch vote of DualPrompt's E-prompt (docs/behaviour.md §9): ``FusedEPrompt(vote_group=...)`` on 2
gloo processes.

One spawn of 2 CPU processes (``init_method=file://`` in tmp_path) runs every scenario on every backend available
on the CPU, for prefix-tuning (``layout='permute'``) and prompt-tuning, and saves what each rank computed; the
parent compares it with one process:

- the global vote on 2 ranks (``"world"`` or a ProcessGroup) equals the 1-process vote on the concatenated batch,
  for random inputs and for hand-made queries whose global counts tie at the K-th place (lower id first);
- the per-rank vote (``vote_group=None``) equals the vote of each rank's half alone (the default, unchanged);
- where the local and the global vote choose the same set (both ranks hold the same rows), outputs and
  gradients of the global path equal the local path's bit for bit;
- a rank with no rows (B = 0) joins the collective and gets empty outputs.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from l2p_fast.dualprompt import FusedEPrompt
from l2p_fast.testing import backend_skip_reason

BACKENDS = tuple(b for b in ("reference", "cpu", "triton") if backend_skip_reason(b, "cpu") is None)
MODES = ("prefix", "tuning")  # use_prefix_tune_for_e_prompt True / False
B_LOCAL, N, D, M, K, LP, LAYERS, HEADS = 3, 4, 8, 6, 2, 2, 2, 2


def make_eprompt(backend: str, mode: str, vote_group: object = None, embedding_key: str = "mean") -> FusedEPrompt:
    """The same seeded E-prompt in every process."""
    torch.manual_seed(0)
    return FusedEPrompt(length=LP, embed_dim=D, embedding_key=embedding_key, prompt_pool=True, prompt_key=True,
                        pool_size=M, top_k=K, batchwise_prompt=True, num_layers=LAYERS,
                        use_prefix_tune_for_e_prompt=mode == "prefix", num_heads=HEADS, backend=backend,
                        vote_group=vote_group)


def random_batch(seed: int) -> torch.Tensor:
    """The global batch (2·B_LOCAL, N, D) of a scenario: rank r takes rows r·B_LOCAL … (r+1)·B_LOCAL − 1."""
    return torch.randn(2 * B_LOCAL, N, D, generator=torch.Generator().manual_seed(seed))


def tied_cls_features() -> torch.Tensor:
    """Queries (4, D) for keys = the first M unit vectors: row i's top-2 is (a_i, b_i), from q = e_a + 0.5·e_b.
    Rank 0 holds (2, 4), (2, 3); rank 1 holds (4, 1), (3, 2). Global counts [0, 1, 3, 2, 2, 0]: ids 3 and 4 tie
    at the K-th place, the lower id wins: (2, 3). Alone, rank 0 votes (2, 3) and rank 1 (counts
    [0, 1, 1, 1, 1, 0]) votes (1, 2)."""
    pairs = ((2, 4), (2, 3), (4, 1), (3, 2))
    q = torch.zeros(len(pairs), D)
    for row, (a, b) in enumerate(pairs):
        q[row, a], q[row, b] = 1.0, 0.5
    return q


def run_eprompt(module: FusedEPrompt, x: torch.Tensor, cls: torch.Tensor | None = None) -> dict:
    """Forward + backward of a fixed loss; returns the outputs and gradients (detached)."""
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, cls_features=cls)
    gen = torch.Generator().manual_seed(1)
    loss = (out["batched_prompt"] * torch.randn(out["batched_prompt"].shape, generator=gen)).sum()
    loss = loss + 0.7 * out["reduce_sim"] + (out["similarity"] * 0.3).sum()
    loss.backward()
    result = {key: value.detach().clone() for key, value in out.items()}
    result.update(grad_prompt=module.prompt.grad.clone(), grad_key=module.prompt_key.grad.clone())
    if x.grad is not None:  # none when the query is cls_features with embedding_key='cls'
        result["grad_x"] = x.grad.clone()
    return result


def worker(rank: int, world: int, init_file: str, out_dir: str, backends: tuple[str, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for backend in backends:
            for mode in MODES:
                x = random_batch(seed=4)[rows]
                results[backend, mode, "global"] = run_eprompt(make_eprompt(backend, mode, "world"), x)
                results[backend, mode, "group"] = run_eprompt(make_eprompt(backend, mode, dist.new_group([0, 1])), x)
                results[backend, mode, "local"] = run_eprompt(make_eprompt(backend, mode, None), x)
                same = random_batch(seed=5)[:B_LOCAL]  # both ranks hold the same rows: the same chosen set
                results[backend, mode, "same_global"] = run_eprompt(make_eprompt(backend, mode, "world"), same)
                results[backend, mode, "same_local"] = run_eprompt(make_eprompt(backend, mode, None), same)
                tied = make_eprompt(backend, mode, "world", embedding_key="cls")
                with torch.no_grad():
                    tied.prompt_key.copy_(torch.eye(M, D))
                cls = tied_cls_features()[rank * 2:(rank + 1) * 2]
                results[backend, mode, "tied"] = run_eprompt(tied, torch.randn(2, N, D), cls)
                tied.vote_group = None
                results[backend, mode, "tied_local"] = run_eprompt(tied, torch.randn(2, N, D), cls)
                # rank 1 holds no rows (a global batch smaller than the world): it still joins the collective
                share = random_batch(seed=7)[: B_LOCAL if rank == 0 else 0]
                with torch.no_grad():
                    out = make_eprompt(backend, mode, "world")(share)
                results[backend, mode, "empty"] = {k: v.clone() for k, v in out.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    folder = tmp_path_factory.mktemp("eprompt_vote_group")
    mp.spawn(worker, args=(2, str(folder / "init"), str(folder), BACKENDS), nprocs=2, join=True)
    return tuple(torch.load(folder / f"rank{r}.pt") for r in range(2))


def one_process(backend: str, mode: str, x: torch.Tensor) -> dict:
    return run_eprompt(make_eprompt(backend, mode, None), x)


PER_ROW = ("prompt_idx", "similarity", "selected_key", "x_embed_norm")  # (B, …) outputs; batched_prompt is (L, B, …)


def assert_rows(result: dict, whole: dict, rows: slice, what: str) -> None:
    for key in PER_ROW:
        assert torch.equal(result[key], whole[key][rows]), (what, key)
    assert torch.equal(result["batched_prompt"], whole["batched_prompt"][:, rows]), what


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_vote_equals_one_process_on_the_concatenated_batch(ranks, backend: str, mode: str) -> None:
    whole = one_process(backend, mode, random_batch(seed=4))
    for rank, result in enumerate(ranks):
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for scenario in ("global", "group"):
            assert_rows(result[backend, mode, scenario], whole, rows, scenario)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_vote_breaks_tied_counts_by_lower_id(ranks, backend: str, mode: str) -> None:
    for result in ranks:
        assert result[backend, mode, "tied"]["prompt_idx"].tolist() == [[2, 3], [2, 3]]
    assert ranks[0][backend, mode, "tied_local"]["prompt_idx"].tolist() == [[2, 3], [2, 3]]
    assert ranks[1][backend, mode, "tied_local"]["prompt_idx"].tolist() == [[1, 2], [1, 2]]
    module = make_eprompt(backend, mode, None, embedding_key="cls")
    with torch.no_grad():
        module.prompt_key.copy_(torch.eye(M, D))
    whole = run_eprompt(module, torch.randn(4, N, D), tied_cls_features())
    assert whole["prompt_idx"].tolist() == [[2, 3]] * 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_rank_vote_is_the_vote_of_each_half(ranks, backend: str, mode: str) -> None:
    x = random_batch(seed=4)
    differs = False
    for rank, result in enumerate(ranks):
        half = one_process(backend, mode, x[rank * B_LOCAL:(rank + 1) * B_LOCAL])
        local = result[backend, mode, "local"]
        assert local.keys() == half.keys()
        for key, value in half.items():
            assert torch.equal(local[key], value), key
        differs |= not torch.equal(local["prompt_idx"], result[backend, mode, "global"]["prompt_idx"])
    assert differs, "the scenario must make a per-rank vote differ from the global one"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_path_outputs_and_gradients_equal_the_local_path(ranks, backend: str, mode: str) -> None:
    for result in ranks:
        glob, local = result[backend, mode, "same_global"], result[backend, mode, "same_local"]
        assert glob.keys() == local.keys()
        for key in glob:
            assert torch.equal(glob[key], local[key]), key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_share_joins_the_vote(ranks, backend: str, mode: str) -> None:
    alone = one_process(backend, mode, random_batch(seed=7)[:B_LOCAL])
    assert_rows(ranks[0][backend, mode, "empty"], alone, slice(None), "rank 0")
    empty = ranks[1][backend, mode, "empty"]
    assert empty["prompt_idx"].shape == (0, K)
    tail = (2, K * LP, HEADS, D // HEADS) if mode == "prefix" else (K * LP, D)
    assert empty["batched_prompt"].shape == (LAYERS, 0, *tail)
    assert empty["similarity"].shape == (0, M)


def test_vote_group_is_checked_and_forwarded() -> None:
    with pytest.raises(ValueError, match="vote_group: expected None, 'world' or a torch.distributed ProcessGroup"):
        make_eprompt("reference", "prefix", "everyone")
    module = make_eprompt("reference", "prefix")
    assert module.vote_group is None
    with pytest.raises(ValueError, match="vote_group"):
        module.vote_group = 3
    module.vote_group = "world"
    assert module.vote_group == "world"
    pytest.importorskip("timm", reason="needs timm (DualPromptViT)")
    from l2p_fast.models import DualPromptViT
    from l2p_fast.testing import tiny_vit

    vit = DualPromptViT.from_timm(tiny_vit(), num_classes=4, g_prompt_layer_idx=(0,), e_prompt_layer_idx=(1,),
                                  vote_group="world")
    assert vit.e_prompt.vote_group == "world"
    with pytest.raises(ValueError, match="vote_group"):
        DualPromptViT.from_timm(tiny_vit(), num_classes=4, g_prompt_layer_idx=(0,), e_prompt_layer_idx=(1,),
                                vote_group="all")


def test_text_encoder_forwards_vote_group() -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    from l2p_fast.models.dualprompt_text import DualPromptTextEncoder
    from l2p_fast.testing import tiny_bert

    model = DualPromptTextEncoder(tiny_bert(), num_classes=2, g_prompt_layer_idx=(0,), e_prompt_layer_idx=(1,),
                                  vote_group="world")
    assert model.e_prompt.vote_group == "world"
    assert DualPromptTextEncoder(tiny_bert(), num_classes=2, g_prompt_layer_idx=(0,),
                                 e_prompt_layer_idx=(1,)).e_prompt.vote_group is None


@pytest.mark.parametrize("mode", MODES)
def test_no_collective_without_the_vote(mode: str) -> None:
    """vote_group only acts on the batch vote without a mask: otherwise no collective runs (none is set up here)."""
    assert not dist.is_initialized()
    x = random_batch(seed=9)
    module = make_eprompt("reference", mode, "world")
    mask = torch.tensor([[1, 4]] * len(x))
    assert torch.equal(module(x, prompt_mask=mask)["prompt_idx"], mask)
    module.batchwise_prompt = False
    local = make_eprompt("reference", mode, None)
    local.batchwise_prompt = False
    assert torch.equal(module(x)["prompt_idx"], local(x)["prompt_idx"])
    with pytest.raises(ValueError, match="x_embed: expected B >= 1"):
        module(x[:0])  # an empty batch is accepted only where it joins the global vote
