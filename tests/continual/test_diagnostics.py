"""Selection diagnostics on hand-made usage counts, learning accuracy, and both in a trainer's results.json."""

from __future__ import annotations

import json
import math

import pytest

from l2p_fast.continual.diagnostics import (
    component_mass_share,
    key_query_similarity,
    selection_accuracy,
    selection_diagnostics,
    task_slots,
    usage_entropy,
    usage_overlap,
)
from l2p_fast.continual.metrics import learning_accuracy, learning_accuracy_per_task, summarize

# 3 tasks, pool of 6, top_k 2: task t's masked entries are 2t, 2t+1
COUNTS = [
    [6, 2, 1, 1, 0, 0],  # task 0: 8 of 10 selections on entries 0-1
    [0, 0, 3, 1, 4, 0],  # task 1: 4 of 8 on entries 2-3
    [0, 0, 0, 0, 0, 0],  # task 2: no selections (not evaluated)
]


def test_task_slots():
    assert task_slots(0, 2, 6) == range(0, 2)
    assert task_slots(2, 2, 6) == range(4, 6)
    assert task_slots(3, 2, 6) is None  # the mask's range would exceed the pool: that task trained unmasked
    with pytest.raises(ValueError, match="top_k"):
        task_slots(0, 0, 6)


def test_selection_accuracy_known_values():
    assert selection_accuracy(COUNTS, 2) == [pytest.approx(80.0), pytest.approx(50.0), None]
    # top_k 3: task 0 owns 0-2 (9 of 10), task 1 owns 3-5 (5 of 8), task 2's range 6-8 exceeds M
    assert selection_accuracy(COUNTS, 3) == [pytest.approx(90.0), pytest.approx(62.5), None]


def test_usage_entropy_known_values():
    uniform = [[1, 1, 1, 1]]
    single = [[0, 5, 0, 0]]
    two = [[3, 3, 0, 0]]
    assert usage_entropy(uniform) == [pytest.approx(1.0)]
    assert usage_entropy(single) == [pytest.approx(0.0)]
    assert usage_entropy(two) == [pytest.approx(math.log(2) / math.log(4))]
    assert usage_entropy([[0, 0]]) == [None]


def test_usage_overlap_known_values():
    overlap = usage_overlap(COUNTS)
    # task 0: (.6, .2, .1, .1, 0, 0); task 1: (0, 0, .375, .125, .5, 0) -> min sums to .1 + .1
    assert overlap[0][1] == pytest.approx(0.2) and overlap[1][0] == pytest.approx(0.2)
    assert overlap[0][0] == pytest.approx(1.0)
    assert overlap[0][2] is None and overlap[2][2] is None
    assert usage_overlap([[1, 0], [0, 1]])[0][1] == pytest.approx(0.0)


def test_component_mass_share_and_key_query_similarity():
    # 2 tasks, 4 components: task 0 owns 0-1, task 1 owns 2-3
    assert component_mass_share([[3.0, 1.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0]]) == [pytest.approx(50.0),
                                                                               pytest.approx(50.0)]
    # 2 tasks, 5 components: 2 per task, the last row belongs to no task (CODA-Prompt's floor(M / T))
    assert component_mass_share([[1.0, 1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 3.0, 1.0, 0.0]]) == [pytest.approx(50.0),
                                                                                          pytest.approx(100.0)]
    with pytest.raises(ValueError, match="at least one component per task"):
        component_mass_share([[1.0, 2.0]] * 3)
    assert key_query_similarity([[1.0, 1.5], [0.5, 2.0]], 2) == [[0.5, 0.75], [0.25, 1.0]]


def test_bad_counts_raise_naming_the_argument():
    with pytest.raises(ValueError, match="counts: expected a non-empty T x M matrix"):
        usage_entropy([1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        selection_accuracy([[1, -1]], 1)


def test_selection_diagnostics_of_a_results_dict():
    masked = {"prompt_counts_test": COUNTS, "config": {"top_k": 2, "use_prompt_mask": True},
              "reduce_sim_per_epoch": [[1.0], [1.2], [1.4]]}
    out = selection_diagnostics(masked)
    assert out["selection_accuracy_per_task"] == [pytest.approx(80.0), pytest.approx(50.0), None]
    assert out["selection_accuracy"] == pytest.approx(65.0)  # tasks without a figure are left out of the mean
    assert out["usage_overlap_mean"] == pytest.approx(0.2)  # the one pair with selections on both sides
    assert out["key_query_similarity_per_epoch"] == [[0.5], [0.6], [0.7]]
    unmasked = selection_diagnostics({**masked, "config": {"top_k": 2, "use_prompt_mask": False}})
    assert "selection_accuracy" not in unmasked and "usage_entropy" in unmasked
    assert selection_diagnostics({"config": {}}) == {}  # a method without prompts
    coda = selection_diagnostics({"component_mass_test": [[2.0, 0.0], [1.0, 1.0]], "config": {}})
    assert coda["component_mass_share_per_task"] == [pytest.approx(100.0), pytest.approx(50.0)]


def test_learning_accuracy_is_the_diagonal():
    acc = [[90.0], [10.0, 20.0], [5.0, 5.0, 30.0]]
    assert learning_accuracy_per_task(acc) == [90.0, 20.0, 30.0]
    assert learning_accuracy(acc) == pytest.approx(140.0 / 3)
    assert summarize(acc)["learning_accuracy"] == pytest.approx(140.0 / 3)
    # a task never learned (10 %) and never forgotten: forgetting stays low, learning accuracy shows it
    never = [[10.0], [10.0, 10.0]]
    assert summarize(never)["forgetting"] == 0.0 and learning_accuracy(never) == pytest.approx(10.0)


def test_trainer_records_learning_accuracy_and_diagnostics(tiny_backbone, tiny_config, tmp_path):
    from l2p_fast.continual.trainer import train

    cfg = tiny_config("l2p", tiny_backbone.name, use_prompt_mask=True, epochs=2)
    results = train(cfg, tmp_path, backbone=tiny_backbone)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["learning_accuracy"] == pytest.approx(learning_accuracy(saved["accuracy_matrix"]))
    assert len(saved["reduce_sim_per_epoch"]) == 5 and all(len(row) == 2 for row in saved["reduce_sim_per_epoch"])
    # the pull term is K cosines summed per example: within [-K, K]
    assert all(-2.0 <= v <= 2.0 for row in saved["reduce_sim_per_epoch"] for v in row)
    diag = saved["selection_diagnostics"]
    assert diag == selection_diagnostics(results)
    assert len(diag["selection_accuracy_per_task"]) == 5
    assert all(v is None or 0.0 <= v <= 100.0 for v in diag["selection_accuracy_per_task"])


def test_resume_keeps_the_per_epoch_similarity(tiny_backbone, tiny_config, tmp_path):
    from l2p_fast.continual.trainer import Trainer
    from l2p_fast.testing import Interrupted, interrupt_after

    cfg = tiny_config("l2p", tiny_backbone.name, use_prompt_mask=True, checkpoint_every=3)
    expected = Trainer(cfg, tmp_path / "full", backbone=tiny_backbone).run()
    with pytest.raises(Interrupted):  # stops inside task 2's second epoch, after the checkpoint of step 15
        Trainer(cfg, tmp_path / "cut", backbone=tiny_backbone, step_hook=interrupt_after(16)).run()
    got = Trainer(cfg, tmp_path / "cut", resume=True, backbone=tiny_backbone).run()
    assert got["reduce_sim_per_epoch"] == expected["reduce_sim_per_epoch"]
    assert got["selection_diagnostics"] == expected["selection_diagnostics"]
