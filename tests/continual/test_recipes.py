"""The paper recipes (recipes/*.json): valid settings files, published numbers beside them, and each one runs as a
smoke test on a tiny random ViT and synthetic images (the recipe's method settings kept, the data and size not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from l2p_fast.continual.config import METHODS, RunConfig, resolve
from l2p_fast.continual.settings import load_settings

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.json"))
# what the smoke test replaces: the data (synthetic 16x16 images, 5 tasks of 2 classes), the size and the machine
SMOKE = {"benchmark": "tensor_file", "classes_per_task": 2, "epochs": 1, "batch_size": 4, "eval_batch_size": 8,
         "image_size": 16, "download": False, "progress": False, "checkpoint_every": 0, "num_threads": 1,
         "precision": "fp32", "backbone": "tiny-vit"}
# per method: what the tiny ViT (width 24) cannot hold (CODA-Prompt's Gram–Schmidt needs width >= components)
SMOKE_METHOD = {"coda-prompt": {"coda_components": 10}}


def test_every_recipe_is_a_valid_settings_file_with_its_source():
    assert {p.name for p in RECIPES} >= {"l2p_split_cifar100.json", "l2p_five_datasets.json"}
    for path in RECIPES:
        settings = load_settings(path)
        assert settings["description"] and settings["source"] and settings["methods"], path.name
        for method, own in settings["methods"].items():
            assert method in METHODS
            resolve(RunConfig(**{**settings["config"], **own, "method": method}))  # every value passes validation
    published = {p.name: json.loads(p.read_text())["published"] for p in RECIPES}
    assert (published["l2p_split_cifar100.json"]["average_accuracy"],
            published["l2p_split_cifar100.json"]["forgetting"]) == (83.83, 7.63)
    assert (published["l2p_five_datasets.json"]["average_accuracy"],
            published["l2p_five_datasets.json"]["forgetting"]) == (81.14, 4.64)
    official = load_settings(RECIPES[0].parent / "l2p_split_cifar100_official.json")["methods"]["l2p"]
    assert (official["prompt_length"], official["top_k"], official["pull_lambda"]) == (10, 4, 1.0)


@pytest.fixture(scope="module")
def synthetic_images(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("images") / "synthetic.pt"

    def split(per_class):
        y = torch.arange(10).repeat_interleave(per_class)
        return {"x": torch.rand(len(y), 3, 16, 16, generator=gen), "y": y}

    torch.save({"train": split(2), "test": split(1), "classes": [f"c{i}" for i in range(10)]}, path)
    return str(path)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_smoke_run(path, synthetic_images, tiny_vit, tmp_path):
    from l2p_fast.continual.compare import compare

    settings = load_settings(path)
    config = RunConfig(**{**settings["config"], **SMOKE, "data": synthetic_images})
    own_settings = {m: {**own, **SMOKE_METHOD.get(m, {})} for m, own in settings["methods"].items()}
    results = compare(list(settings["methods"]), config, tmp_path, method_settings=own_settings,
                      backbone=tiny_vit, plots=False)
    for result, (method, own) in zip(results, settings["methods"].items(), strict=True):
        assert result["method"] == method and len(result["accuracy_matrix"]) == 5
        for field, value in own.items():  # the recipe's method settings reached the run
            if field not in SMOKE_METHOD.get(method, {}):
                assert result["config"][field] == value, field
        assert result["selection_diagnostics"], method  # selection accuracy / usage, or CODA's component mass
