"""Continual-learning metrics (docs/behaviour.md §7) on hand-made matrices with known answers."""

import numpy as np
import pytest
import torch

from l2p_fast.continual.metrics import (
    as_accuracy_matrix,
    average_accuracy,
    average_accuracy_curve,
    backward_transfer,
    empty_accuracy_matrix,
    forgetting,
    summarize,
)

RAGGED = [[90.0], [80.0, 85.0], [70.0, 75.0, 95.0]]


def test_known_values_ragged():
    assert average_accuracy(RAGGED) == pytest.approx(80.0)
    # task 0: max(90, 80) - 70 = 20; task 1: 85 - 75 = 10
    assert forgetting(RAGGED) == pytest.approx(15.0)
    assert backward_transfer(RAGGED) == pytest.approx(((70 - 90) + (75 - 85)) / 2)
    assert average_accuracy_curve(RAGGED) == pytest.approx([90.0, 82.5, 80.0])
    assert average_accuracy(RAGGED, after_task=1) == pytest.approx(82.5)


def test_forgetting_uses_best_earlier_accuracy_not_diagonal():
    acc = [[50.0], [60.0, 80.0], [55.0, 70.0, 90.0]]
    # task 0 peaked after task 1 (60), not right after it was learned (50)
    assert forgetting(acc) == pytest.approx(((60 - 55) + (80 - 70)) / 2)
    assert backward_transfer(acc) == pytest.approx(((55 - 50) + (70 - 80)) / 2)


def test_improvement_gives_negative_forgetting():
    assert forgetting([[50.0], [70.0, 80.0]]) == pytest.approx(-20.0)


def test_single_task():
    assert forgetting([[42.0]]) == 0.0
    assert backward_transfer([[42.0]]) == 0.0
    assert average_accuracy([[42.0]]) == pytest.approx(42.0)


def test_upper_triangle_is_ignored_and_inputs_interchangeable():
    square = np.array([[90.0, 1e9, np.nan], [80.0, 85.0, -5.0], [70.0, 75.0, 95.0]])
    for acc in (square, torch.tensor(square), square.tolist()):
        assert average_accuracy(acc) == pytest.approx(80.0)
        assert forgetting(acc) == pytest.approx(15.0)
    normalised = as_accuracy_matrix(RAGGED)
    assert np.isnan(normalised[0, 1]) and np.isnan(normalised[1, 2])
    assert normalised[2, 0] == 70.0


def test_matches_brute_force_on_random_matrices():
    rng = np.random.default_rng(0)
    for num in (2, 3, 7):
        acc = rng.uniform(0, 100, size=(num, num))
        last = num - 1
        expected_f = np.mean([max(acc[t][i] for t in range(i, last)) - acc[last][i] for i in range(last)])
        assert forgetting(acc) == pytest.approx(expected_f)
        assert average_accuracy(acc) == pytest.approx(np.mean(acc[last]))


@pytest.mark.parametrize(
    "bad",
    [
        [],
        np.zeros((2, 3)),
        np.zeros((2, 2, 2)),
        [[1.0], [2.0]],  # row 1 needs two entries
        [[1.0, 2.0, 3.0]],  # more entries than tasks
        [[1.0], [float("nan"), 2.0]],
        "acc",
    ],
)
def test_bad_shapes_raise(bad):
    with pytest.raises(ValueError, match="acc_matrix"):
        average_accuracy(bad)
    with pytest.raises(ValueError, match="acc_matrix"):
        forgetting(bad)


def test_bad_after_task_raises():
    with pytest.raises(ValueError, match="after_task"):
        average_accuracy(RAGGED, after_task=3)


def test_empty_matrix_and_summary():
    acc = empty_accuracy_matrix(2)
    assert acc.shape == (2, 2) and np.isnan(acc).all()
    acc[0, 0], acc[1, 0], acc[1, 1] = 60.0, 40.0, 80.0
    out = summarize(acc)
    assert out["average_accuracy"] == pytest.approx(60.0)
    assert out["forgetting"] == pytest.approx(20.0)
    assert out["acc_matrix"] == [[60.0], [40.0, 80.0]]
    with pytest.raises(ValueError, match="num_tasks"):
        empty_accuracy_matrix(0)
