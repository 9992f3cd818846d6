"""The image path: a tiny random timm ViT on a synthetic tensor_file benchmark (no downloads)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm", reason="needs timm (the ViT backbone)")

from l2p_fast.continual.backbones import load_vision_backbone  # noqa: E402
from l2p_fast.continual.config import RunConfig  # noqa: E402
from l2p_fast.continual.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("images") / "synthetic.pt"

    def split(per_class):
        y = torch.arange(4).repeat_interleave(per_class)
        x = torch.rand(len(y), 3, 16, 16, generator=gen) * 0.5 + y.view(-1, 1, 1, 1) * 0.15
        return {"x": x, "y": y}

    torch.save({"train": split(4), "test": split(2), "classes": ["a", "b", "c", "d"]}, path)
    return str(path)


@pytest.mark.parametrize("method", ["l2p", "seq", "seq-frozen", "er"])
def test_vision_methods_run(method, image_file, tiny_vit, tmp_path):
    cfg = RunConfig(method=method, benchmark="tensor_file", data=image_file, classes_per_task=2, epochs=1,
                    batch_size=4, pool_size=4, top_k=1, prompt_length=2, buffer_per_class=1, progress=False,
                    checkpoint_every=0, num_threads=1)
    results = train(cfg, tmp_path / "a", backbone=tiny_vit)
    matrix = results["accuracy_matrix"]
    assert [len(r) for r in matrix] == [1, 2]
    assert results["benchmark"] == "tensor_file" and results["train_size"] == 16 and results["test_size"] == 8
    # 4 test images per task: every accuracy is a multiple of 25 %
    assert all(0.0 <= a <= 100.0 and a % 25.0 == 0.0 for row in matrix for a in row), matrix
    assert results["average_accuracy"] == pytest.approx(sum(matrix[-1]) / 2)
    assert results["train_examples"] == 16  # replayed examples are not counted
    assert results["tasks"] == [["a", "b"], ["c", "d"]]
    if method == "l2p":
        assert [sum(c) for c in results["prompt_counts_test"]] == [4, 4]  # the last evaluation: 4 images per task
        assert [sum(c) for c in results["prompt_counts_train"]] == [8, 8]  # 8 training images per task, top_k 1
    if method == "er":
        assert results["buffer_size"] == 4  # 1 per class
    again = train(cfg, tmp_path / "b", backbone=tiny_vit)
    assert again["accuracy_matrix"] == matrix  # seeded: the same numbers again


def test_vision_backbone_errors():
    with pytest.raises(ValueError, match="backbone: expected a timm model name"):
        load_vision_backbone("not_a_model_xyz", pretrained=False, image_size=32)
    with pytest.raises(ValueError, match="VisionTransformer"):
        load_vision_backbone("resnet18", pretrained=False, image_size=32)
    backbone = load_vision_backbone("vit_tiny_patch16_224", pretrained=False, image_size=32)
    assert backbone.kind == "vision" and backbone.width == 192


def test_text_backbone_on_image_benchmark_is_an_error(image_file, tiny_backbone, tmp_path):
    cfg = RunConfig(method="seq", benchmark="tensor_file", data=image_file, classes_per_task=2, progress=False)
    with pytest.raises(ValueError, match="needs a vision backbone"):
        train(cfg, tmp_path, backbone=tiny_backbone)
