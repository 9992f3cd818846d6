"""PNG writers: files exist, are valid PNGs of a sensible size; inputs are validated."""

import numpy as np
import pytest
import torch
from PIL import Image

from l2p_fast.continual.plots import (
    plot_accuracy_matrix,
    plot_prompt_usage,
    plot_task_accuracy,
    prompt_usage_frequencies,
)

ACC = [[92.0], [71.5, 88.0], [60.0, 70.0, 90.0], [55.0, 62.0, 80.0, 91.0]]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.width > 200 and img.height > 200
        # not a blank canvas
        assert np.asarray(img.convert("L")).std() > 5


def test_accuracy_matrix(tmp_path):
    out = plot_accuracy_matrix(ACC, tmp_path / "sub" / "acc.png", task_names=["a", "b", "c", "d"])
    assert out == tmp_path / "sub" / "acc.png"
    assert_png(out)
    with pytest.raises(ValueError, match="task_names"):
        plot_accuracy_matrix(ACC, tmp_path / "x.png", task_names=["a"])
    with pytest.raises(ValueError, match="acc_matrix"):
        plot_accuracy_matrix([[1.0], [2.0]], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_task_accuracy_single_and_methods(tmp_path):
    assert_png(plot_task_accuracy(ACC, tmp_path / "single.png"))
    methods = {"l2p": ACC, "finetune": np.tril(np.full((4, 4), 30.0) + np.eye(4) * 60)}
    assert_png(plot_task_accuracy(methods, tmp_path / "methods.png", title="CIFAR"))
    plain = (tmp_path / "methods.png").read_bytes()
    assert_png(plot_task_accuracy(methods, tmp_path / "ref.png", title="CIFAR", reference={"joint": 75.0}))
    assert (tmp_path / "ref.png").read_bytes() != plain
    with pytest.raises(ValueError, match="empty"):
        plot_task_accuracy({}, tmp_path / "none.png")


def test_prompt_usage(tmp_path):
    counts = torch.tensor([[30, 0, 10, 0, 0], [0, 25, 5, 10, 0], [0, 0, 0, 0, 0]])
    freq = prompt_usage_frequencies(counts)
    assert np.allclose(freq.sum(axis=1), [1.0, 1.0, 0.0])
    assert freq[0, 0] == pytest.approx(0.75) and freq[1, 3] == pytest.approx(0.25)
    assert_png(plot_prompt_usage(counts, tmp_path / "bar.png"))
    assert_png(plot_prompt_usage(counts.numpy(), tmp_path / "heat.png", kind="heatmap"))
    with pytest.raises(ValueError, match="kind"):
        plot_prompt_usage(counts, tmp_path / "x.png", kind="pie")
    with pytest.raises(ValueError, match="T x M"):
        plot_prompt_usage([1, 2, 3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-negative"):
        prompt_usage_frequencies([[1, -1]])
