"""Parallel input loading: per-item augmentation seeds, worker processes, and runs that do not depend on them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm", reason="needs timm (the ViT backbone)")
PIL = pytest.importorskip("PIL.Image", reason="needs Pillow (image files)")

from l2p_fast.continual.batching import build_pool  # noqa: E402
from l2p_fast.continual.benchmarks.files import image_folder  # noqa: E402
from l2p_fast.continual.config import RunConfig  # noqa: E402
from l2p_fast.continual.loading import item_seeds, load_batches  # noqa: E402
from l2p_fast.continual.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """4 classes x 5 random 24x24 PNG images."""
    root = tmp_path_factory.mktemp("folder")
    gen = torch.Generator().manual_seed(0)
    for c in range(4):
        (root / f"class{c}").mkdir()
        for i in range(5):
            pixels = (torch.rand(24, 24, 3, generator=gen) * 60 + c * 60).to(torch.uint8).numpy()
            PIL.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return str(root)


def test_item_seeds_are_fixed_by_the_step():
    a = item_seeds(0, 1, 2, 3, 5)
    assert a.shape == (5,) and a.dtype == torch.long and torch.equal(a, item_seeds(0, 1, 2, 3, 5))
    assert not torch.equal(a, item_seeds(0, 1, 2, 4, 5))


def test_seeded_items_repeat_and_leave_the_global_rng_alone(folder):
    pool = build_pool(image_folder(folder, classes_per_task=2, image_size=16), "train")
    idx = torch.arange(6)
    seeds = item_seeds(0, 0, 0, 0, 6)
    state = torch.get_rng_state()
    a = pool.collate(idx, seeds=seeds)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, pool.collate(idx, seeds=seeds)) and a.shape == (6, 3, 16, 16)
    assert not torch.equal(a, pool.collate(idx, seeds=seeds + 1))  # random crops differ


@pytest.mark.parametrize("workers", [0, 2])
def test_load_batches_any_workers_same_tensors(folder, workers):
    pool = build_pool(image_folder(folder, classes_per_task=2, image_size=16), "train")
    batches = list(torch.arange(len(pool)).split(4))
    seeds = [item_seeds(1, 0, 0, j, len(b)) for j, b in enumerate(batches)]
    got = list(load_batches(pool, batches, seeds, torch.device("cpu"), workers))
    for x, b, s in zip(got, batches, seeds, strict=True):
        assert torch.equal(x, pool.collate(b, seeds=s))


def test_load_batches_errors(folder):
    pool = build_pool(image_folder(folder, classes_per_task=2, image_size=16), "train")
    with pytest.raises(ValueError, match=r"num_workers: expected an integer >= 0, got -1"):
        list(load_batches(pool, [torch.arange(2)], [None], torch.device("cpu"), -1))
    with pytest.raises(ValueError, match=r"seeds: expected one entry per batch \(1\), got 2"):
        list(load_batches(pool, [torch.arange(2)], [None, None], torch.device("cpu"), 0))


def test_run_does_not_depend_on_workers(folder, tiny_vit, tmp_path):
    def run(workers, out):
        cfg = RunConfig(method="l2p", benchmark="image_folder", data=folder, classes_per_task=2, epochs=1,
                        batch_size=4, pool_size=4, top_k=1, prompt_length=2, image_size=16, progress=False,
                        checkpoint_every=0, num_threads=1, num_workers=workers)
        trainer = Trainer(cfg, tmp_path / out, backbone=tiny_vit)
        return trainer.run(), trainer.method.model

    (a, model_a), (b, model_b) = run(0, "a"), run(2, "b")
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["prompt_counts_train"] == b["prompt_counts_train"]
    assert a["config"]["num_workers"] == 0 and b["config"]["num_workers"] == 2
