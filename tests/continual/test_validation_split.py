"""The validation split: held out of each class's training data, deterministic, never the test set."""

from __future__ import annotations

import pytest

from l2p_fast.continual.benchmarks import validation_split, wordnet20
from l2p_fast.continual.config import RunConfig, resolve


def _texts(datasets):
    return [[d[i][0] for i in range(len(d))] for d in datasets]


def test_split_is_carved_from_training_data_per_class():
    bench = wordnet20(train_per_class=10, test_per_class=3)
    split = validation_split(bench, 0.25)
    test_texts = {t for task in _texts(bench.test) for t in task}
    for t in range(bench.num_tasks):
        kept, held = _texts([split.train[t], split.test[t]])
        original = _texts([bench.train[t]])[0]
        assert sorted(kept + held) == sorted(original)  # a partition of the task's training data
        assert not set(held) & test_texts  # the test set is never read
        labels = [split.test[t][i][1] for i in range(len(split.test[t]))]
        assert all(labels.count(y) == 3 for y in bench.task_labels(t))  # ceil(0.25 * 10) per class
        assert len(split.train[t]) == 4 * 7
    assert split.tasks == bench.tasks and split.class_order == bench.class_order


def test_split_is_deterministic_and_independent_of_the_class_order():
    a = validation_split(wordnet20(train_per_class=8, test_per_class=1), 0.5)
    b = validation_split(wordnet20(train_per_class=8, test_per_class=1), 0.5)
    assert _texts(a.test) == _texts(b.test)
    shuffled = validation_split(wordnet20(train_per_class=8, test_per_class=1, seed=5), 0.5)
    assert {t for task in _texts(shuffled.test) for t in task} == {t for task in _texts(a.test) for t in task}


def test_bad_fraction_or_too_few_items():
    bench = wordnet20(train_per_class=1, test_per_class=1)
    with pytest.raises(ValueError, match=r"validation_fraction: expected a number in \(0, 1\), got 1.0"):
        validation_split(bench, 1.0)
    with pytest.raises(ValueError, match="needs at least 2 per class"):
        validation_split(bench, 0.5)
    with pytest.raises(ValueError, match=r"validation_fraction: expected a number in \[0, 1\), got 1.5"):
        resolve(RunConfig(validation_fraction=1.5))
    with pytest.raises(ValueError, match="validation_fraction: expected a finite number >= 0.0"):
        resolve(RunConfig(validation_fraction=-0.1))


def test_a_run_with_validation_evaluates_on_the_held_out_part(tiny_backbone, tiny_config, tmp_path):
    from l2p_fast.continual.trainer import train

    results = train(tiny_config("seq-frozen", tiny_backbone.name, validation_fraction=0.25, epochs=1), tmp_path,
                    backbone=tiny_backbone)
    assert results["train_size"] == 20 * 3 and results["test_size"] == 20 * 1  # 4 per class: 3 kept, 1 held out
    assert results["config"]["validation_fraction"] == 0.25
    # a validation run is another run: --resume never mixes it with a test-set run's checkpoint
    assert RunConfig(validation_fraction=0.25).fingerprint() != RunConfig().fingerprint()


def test_cli_flag():
    from l2p_fast.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--method", "l2p", "--output", "x", "--validation", "0.2"])
    assert config_from_args(args, "l2p").validation_fraction == 0.2
