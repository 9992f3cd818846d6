"""``l2p`` and ``l2p+er``: the prompted models of ``l2p_fast.models`` on the frozen backbone.

Loss = masked cross-entropy − λ · ``reduce_sim`` (the pull constraint, docs/behaviour.md §1). Text queries come
from the trainer's feature cache (the frozen encoder's mean-pooled embedding, which is exactly
``L2PTextEncoder.query``); images compute theirs on the fly (augmentation changes every view).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..backbones import Backbone
from .base import Method


class L2P(Method):
    """Learning to Prompt; with a replay buffer when the method is ``l2p+er``."""

    name = "l2p"
    uses_prompts = True
    frozen_backbone = True

    def __init__(self, config: Any, backbone: Backbone, num_classes: int) -> None:
        self.uses_feature_cache = backbone.kind == "text"
        super().__init__(config, backbone, num_classes)

    def build(self, backbone: Backbone, num_classes: int) -> nn.Module:
        cfg = self.config
        options = dict(
            num_classes=num_classes,
            length=cfg.prompt_length,
            pool_size=cfg.pool_size,
            top_k=cfg.top_k,
            embedding_key="cls",
            batchwise_prompt=cfg.batchwise_prompt,
            head_type=cfg.head_type,
            use_prompt_mask=cfg.use_prompt_mask,
            backend=cfg.backend,
            final_tokens="head",  # the trainer reads logits and reduce_sim only: skip the last-block rows no head reads
        )
        if backbone.kind == "text":
            from ...models import L2PTextEncoder

            return L2PTextEncoder(backbone.copy(), tokenizer=backbone.tokenizer, max_length=cfg.max_length, **options)
        try:
            from ...models import L2PViT
        except ImportError as error:
            raise ValueError("method 'l2p' on images needs l2p_fast.models.L2PViT, which is not available") from error
        return L2PViT.from_timm(backbone.copy(), pretrained=False, **options)

    def forward(self, inputs: Any, cached: Tensor | None, task_id: int, train: bool) -> dict[str, Any]:
        if self.kind == "text":
            return self.model(**inputs, task_id=task_id, cls_features=cached, train=train)
        return self.model(inputs, task_id=task_id, cls_features=cached, train=train)

    def loss(self, out: dict[str, Any], labels: Tensor, class_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss, parts = super().loss(out, labels, class_mask)
        if self.config.pull_lambda:
            loss = loss - self.config.pull_lambda * out["reduce_sim"]
        parts["reduce_sim"] = float(out["reduce_sim"].detach())
        return loss, parts
