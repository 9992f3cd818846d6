"""L2P's training options in the trainer: ``diversity`` (docs/behaviour.md §8) and ``shared_prompt_pool`` /
``shared_prompt_key`` (§10), on the tiny text benchmark: runs, counts, frequency, resume."""

from __future__ import annotations

import pytest
import torch

from l2p_fast.continual.trainer import Trainer, train
from l2p_fast.testing import Interrupted, interrupt_after


def test_diversity_counts_and_sets_the_frequency(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("l2p", tiny_backbone.name, diversity=True)
    trainer = Trainer(cfg, tmp_path, backbone=tiny_backbone)
    results = trainer.run()
    method = trainer.method
    # every trained row (4 classes x 4 examples x 2 epochs a task) counted with its K ids, for all 5 tasks
    assert int(method.past_counts.sum()) == 5 * 4 * 4 * 2 * cfg.top_k
    assert torch.equal(method.past_counts, torch.tensor(results["prompt_counts_train"]).sum(0))
    frequency = method.pool.prompt_frequency
    assert torch.allclose(frequency.double(), method.past_counts.double() / method.past_counts.sum())
    plain = train(tiny_config("l2p", tiny_backbone.name), tmp_path / "plain", backbone=tiny_backbone)
    assert plain["prompt_counts_train"][0] == results["prompt_counts_train"][0]  # task 0: nothing to penalise
    assert plain["prompt_counts_train"] != results["prompt_counts_train"]


def test_shared_prompt_key_alone_runs_every_task(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("l2p", tiny_backbone.name, shared_prompt_key=True, use_prompt_mask=True, pool_size=10)
    trainer = Trainer(cfg, tmp_path, backbone=tiny_backbone)
    trainer.run()
    assert trainer.method.shared_task == 4  # task 4's slots 8, 9 fit in M = 10: every task shared


@pytest.mark.parametrize("stop", [23])
def test_resume_with_the_options_reproduces_the_uninterrupted_run(stop, tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("l2p", tiny_backbone.name, diversity=True, shared_prompt_pool=True, shared_prompt_key=True,
                      checkpoint_every=3)
    full = Trainer(cfg, tmp_path / "full", backbone=tiny_backbone)
    expected = full.run()
    broken = Trainer(cfg, tmp_path / "cut", backbone=tiny_backbone, step_hook=interrupt_after(stop))
    with pytest.raises(Interrupted):
        broken.run()
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, backbone=tiny_backbone)
    got = resumed.run()
    assert got["accuracy_matrix"] == expected["accuracy_matrix"]
    assert got["prompt_counts_train"] == expected["prompt_counts_train"]
    assert torch.equal(resumed.method.past_counts, full.method.past_counts)
    for (name, p), q in zip(full.method.model.named_parameters(), resumed.method.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_end_task_adds_the_trainers_counts(tiny_backbone, tiny_config):
    from l2p_fast.continual.config import resolve
    from l2p_fast.continual.methods import TaskEnd, make_method

    method = make_method(resolve(tiny_config("l2p", tiny_backbone.name, diversity=True)), tiny_backbone, 20)
    info = TaskEnd(0, torch.arange(4), torch.zeros(4, dtype=torch.long), torch.Generator(), lambda indices: None,
                   selection_counts=torch.tensor([0, 2, 2, 0, 0, 4]))
    method.end_task(info)
    assert method.past_counts.tolist() == [0, 2, 2, 0, 0, 4]
    assert method.pool.prompt_frequency.tolist() == [0.0, 0.25, 0.25, 0.0, 0.0, 0.5]
    method.end_task(TaskEnd(1, info.indices, info.labels, info.gen, info.backward_on,
                            selection_counts=torch.tensor([4, 0, 0, 0, 0, 0])))
    assert method.past_counts.tolist() == [4, 2, 2, 0, 0, 4]
    with pytest.raises(ValueError, match="diversity: the task's selection counts are needed"):
        method.end_task(TaskEnd(2, info.indices, info.labels, info.gen, info.backward_on))


def test_shared_prompts_are_copied_when_the_task_begins(tiny_backbone, tiny_config):
    """begin_task(t) copies task t−1's slots once (idempotent, as on a resume inside the task)."""
    from l2p_fast.continual.config import resolve
    from l2p_fast.continual.methods import make_method

    cfg = resolve(tiny_config("l2p", tiny_backbone.name, shared_prompt_pool=True, use_prompt_mask=True))
    method = make_method(cfg, tiny_backbone, 20)
    prompt = method.pool.prompt
    k = cfg.top_k
    with torch.no_grad():
        prompt[:k].fill_(1.0)
    method.begin_task(0)
    assert method.shared_task == 0
    method.begin_task(1)
    assert method.shared_task == 1 and torch.equal(prompt[k: 2 * k], prompt[:k])
    with torch.no_grad():
        prompt[k: 2 * k].fill_(2.0)  # trained in task 1; a second begin_task(1) (a resume) must keep it
    method.begin_task(1)
    assert bool((prompt[k: 2 * k] == 2.0).all())


def _diversity_worker(rank: int, init_file: str, bert_path: str, config: dict, out_dir: str) -> None:
    from l2p_fast.continual import distributed
    from l2p_fast.continual.backbones import load_text_backbone
    from l2p_fast.continual.config import RunConfig

    torch.set_num_threads(1)
    distributed.init("cpu", init_method=f"file://{init_file}", world_size=2, rank=rank, timeout=60)
    try:
        trainer = Trainer(RunConfig(**config), f"{out_dir}/run", backbone=load_text_backbone(bert_path))
        results = trainer.run()
        torch.save({"results": results, "past_counts": trainer.method.past_counts},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_count_the_selections_of_one(tiny_backbone, tiny_bert_path, tmp_path, tiny_config):
    """--diversity on 2 gloo processes: the end-of-task sum over the processes gives one process's counts, so the
    frequencies, the selections and the accuracy matrix are those of one process (uninterrupted runs)."""
    import torch.multiprocessing as mp

    cfg = tiny_config("l2p", tiny_bert_path, diversity=True, batch_size=5, eval_batch_size=5)
    one = Trainer(cfg, tmp_path / "one", backbone=tiny_backbone)
    expected = one.run()
    mp.spawn(_diversity_worker, args=(str(tmp_path / "init"), tiny_bert_path, cfg.to_dict(), str(tmp_path)),
             nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(got["past_counts"], one.method.past_counts)
        assert got["results"]["prompt_counts_train"] == expected["prompt_counts_train"]
        assert got["results"]["accuracy_matrix"] == expected["accuracy_matrix"]
