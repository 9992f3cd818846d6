"""Tiny end-to-end runs of every method, metrics of the results, resume after an interruption."""

from __future__ import annotations

import json

import pytest
import torch

from l2p_fast.continual import metrics
from l2p_fast.continual.checkpoint import CHECKPOINT_NAME, CheckpointError
from l2p_fast.continual.config import METHODS
from l2p_fast.continual.output import OutputError
from l2p_fast.continual.trainer import Trainer, class_mask, phases_of, train
from l2p_fast.testing import Interrupted, interrupt_after


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(method, tiny_backbone, tmp_path, tiny_config):
    results = train(tiny_config(method, tiny_backbone.name), tmp_path, backbone=tiny_backbone)
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("method", "benchmark", "average_accuracy", "forgetting", "accuracy_matrix", "seconds", "config"):
        assert key in saved
    assert saved["method"] == method and saved["benchmark"] == "wordnet20"
    assert saved["config"]["method"] == method
    matrix = results["accuracy_matrix"]
    if method == "joint":
        assert len(matrix) == 1 and len(matrix[0]) == 5 and results["forgetting"] is None
        assert results["average_accuracy"] == pytest.approx(sum(matrix[0]) / 5)
    else:
        assert [len(r) for r in matrix] == [1, 2, 3, 4, 5]
        assert results["average_accuracy"] == pytest.approx(metrics.average_accuracy(matrix))
        assert results["forgetting"] == pytest.approx(metrics.forgetting(matrix))
    assert all(0.0 <= a <= 100.0 for row in matrix for a in row)
    # every test item has 2 per class, 4 classes per task: accuracies are multiples of 12.5
    assert all((a / 12.5) == int(a / 12.5) for row in matrix for a in row)
    assert results["train_examples"] == 80 * 2
    if method in ("l2p", "l2p+er"):
        train_counts = torch.tensor(results["prompt_counts_train"])
        # each task: 16 examples x 2 epochs x top_k 2 selections
        assert train_counts.sum(dim=1).tolist() == [64] * 5
        assert torch.tensor(results["prompt_counts_test"]).sum(dim=1).tolist() == [8 * 2] * 5
    if method in ("er", "l2p+er"):
        assert results["buffer_size"] == 20 * 2


def test_frozen_methods_keep_the_backbone(tiny_backbone, tmp_path, tiny_config):
    before = tiny_backbone.fingerprint()
    trainer = Trainer(tiny_config("l2p", tiny_backbone.name), tmp_path, backbone=tiny_backbone)
    trainer.run()
    encoder = trainer.method.model.backbone
    assert all(not p.requires_grad for p in encoder.parameters())
    copy_state = encoder.state_dict()
    for key, value in tiny_backbone.model.state_dict().items():
        assert torch.equal(copy_state[key], value), key
    assert tiny_backbone.fingerprint() == before


def test_same_seed_same_result_other_seed_differs(tiny_backbone, tmp_path, tiny_config):
    a = train(tiny_config("seq-frozen", tiny_backbone.name), tmp_path / "a", backbone=tiny_backbone)
    b = train(tiny_config("seq-frozen", tiny_backbone.name), tmp_path / "b", backbone=tiny_backbone)
    c = train(tiny_config("seq-frozen", tiny_backbone.name, seed=4, lr=0.05), tmp_path / "c", backbone=tiny_backbone)
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["accuracy_matrix"] != c["accuracy_matrix"]


@pytest.mark.parametrize("method,stop", [("l2p+er", 23), ("ewc", 26), ("seq-frozen", 8)])
def test_resume_reproduces_uninterrupted_run(method, stop, tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config(method, tiny_backbone.name, checkpoint_every=3)
    full = Trainer(cfg, tmp_path / "full", backbone=tiny_backbone)
    expected = full.run()
    broken = Trainer(cfg, tmp_path / "cut", backbone=tiny_backbone, step_hook=interrupt_after(stop))
    with pytest.raises(Interrupted):
        broken.run()
    assert (tmp_path / "cut" / CHECKPOINT_NAME).exists() and not (tmp_path / "cut" / "results.json").exists()
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, backbone=tiny_backbone)
    got = resumed.run()
    assert got["accuracy_matrix"] == expected["accuracy_matrix"]
    assert got.get("prompt_counts_train") == expected.get("prompt_counts_train")
    for (name, p), q in zip(full.method.model.named_parameters(), resumed.method.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_existing_checkpoint_needs_resume(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("seq-frozen", tiny_backbone.name)
    train(cfg, tmp_path, backbone=tiny_backbone)
    with pytest.raises(OutputError, match="already holds an earlier run .*checkpoint.pt.*--resume"):
        Trainer(cfg, tmp_path, backbone=tiny_backbone)
    # a finished run resumes to the same results without training again
    again = Trainer(cfg, tmp_path, resume=True, backbone=tiny_backbone).run()
    assert again["accuracy_matrix"] == json.loads((tmp_path / "results.json").read_text())["accuracy_matrix"]


def test_mismatched_or_corrupt_checkpoint_is_an_error(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("seq-frozen", tiny_backbone.name)
    train(cfg, tmp_path, backbone=tiny_backbone)
    with pytest.raises(CheckpointError, match="another configuration"):
        Trainer(tiny_config("seq-frozen", tiny_backbone.name, epochs=3), tmp_path, resume=True,
                backbone=tiny_backbone).run()
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        Trainer(cfg, tmp_path, resume=True, backbone=tiny_backbone).run()


def test_phases_and_class_masks(tiny_backbone):
    from l2p_fast.continual.benchmarks import wordnet20

    assert [p.eval_tasks for p in phases_of("l2p", 3)] == [(0,), (0, 1), (0, 1, 2)]
    assert phases_of("joint", 3)[0].train_tasks == (0, 1, 2)
    bench = wordnet20(train_per_class=1, test_per_class=1)
    device = torch.device("cpu")
    assert class_mask("task", bench, (1,), device).nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert class_mask("seen", bench, (1,), device).nonzero().flatten().tolist() == list(range(8))
    assert bool(class_mask("all", bench, (0,), device).all())


def test_ewc_penalty_matches_formula_and_changes_training(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("ewc", tiny_backbone.name, lr=1e-3, ewc_lambda=5000.0)
    trainer = Trainer(cfg, tmp_path / "ewc", backbone=tiny_backbone)
    ewc = trainer.run()
    method = trainer.method
    assert method.fisher and all(float(f.min()) >= 0 for f in method.fisher.values())
    assert sum(float(f.sum()) for f in method.fisher.values()) > 0
    assert float(method.penalty().detach()) == 0.0  # at the anchor
    name, param = next((n, p) for n, p in method.model.named_parameters() if n == "head.weight")
    with torch.no_grad():
        param.add_(0.1)
    expected = 0.5 * 5000.0 * float((method.fisher[name] * 0.01).sum())
    assert float(method.penalty().detach()) == pytest.approx(expected, rel=1e-4)
    seq = train(tiny_config("seq", tiny_backbone.name, lr=1e-3), tmp_path / "seq", backbone=tiny_backbone)
    assert seq["accuracy_matrix"] != ewc["accuracy_matrix"]
