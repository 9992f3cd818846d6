"""``l2p`` and ``l2p+er``: the prompted models of ``l2p_fast.models`` on the frozen backbone.

Loss = masked cross-entropy − λ · ``reduce_sim`` (the pull constraint, docs/behaviour.md §1). Text queries come
from the trainer's feature cache (the frozen encoder's mean-pooled embedding, which is exactly
``L2PTextEncoder.query``); images compute theirs on the fly (augmentation changes every view).

Options (docs/behaviour.md §8, §10):
- ``diversity``: at the end of each task the task's selection counts (the trainer's ``counts_train`` row: the
  prompt ids of the task's own training rows, summed over the processes, checkpointed with the run) are added
  to those of earlier tasks, and the normalised sum becomes the pool's ``prompt_frequency`` for the next tasks'
  training (evaluation never uses it).
- ``shared_prompt_pool`` / ``shared_prompt_key``: when task t > 0 begins (:meth:`begin_task`, on every process,
  before its first step), task t−1's prompt slots / keys are copied into task t's
  (``FusedPromptPool.share_previous_task``).
Both states (the past counts, the last task shared) are part of the method's checkpointed state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backbones import Backbone
from .base import Method, TaskEnd


class L2P(Method):
    """Learning to Prompt; with a replay buffer when the method is ``l2p+er``."""

    name = "l2p"
    uses_prompts = True
    frozen_backbone = True

    def __init__(self, config: Any, backbone: Backbone, num_classes: int) -> None:
        self.uses_feature_cache = backbone.kind == "text"
        super().__init__(config, backbone, num_classes)
        pool_size = config.pool_size
        self.past_counts = torch.zeros(pool_size, dtype=torch.int64)  # selections in finished tasks (diversity)
        self.shared_task = 0  # the last task whose slots were filled from the previous task's

    def pool_options(self, num_classes: int) -> dict[str, Any]:
        """The prompted model's pool and head arguments from the config (shared with ``dualprompt``)."""
        cfg = self.config
        return dict(
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

    def build(self, backbone: Backbone, num_classes: int) -> nn.Module:
        cfg = self.config
        options = self.pool_options(num_classes)
        if backbone.kind == "text":
            from ...models import L2PTextEncoder

            return L2PTextEncoder(backbone.copy(), tokenizer=backbone.tokenizer, max_length=cfg.max_length, **options)
        try:
            from ...models import L2PViT
        except ImportError as error:
            raise ValueError("method 'l2p' on images needs l2p_fast.models.L2PViT, which is not available") from error
        return L2PViT.from_timm(backbone.copy(), pretrained=False, **options)

    @property
    def pool(self) -> nn.Module:
        """The model's ``FusedPromptPool``."""
        return self.model.prompt

    def begin_task(self, task_id: int) -> None:
        cfg = self.config
        if task_id > self.shared_task and (cfg.shared_prompt_pool or cfg.shared_prompt_key):
            self.pool.share_previous_task(task_id, prompts=cfg.shared_prompt_pool, keys=cfg.shared_prompt_key)
            self.shared_task = task_id

    def forward(self, inputs: Any, cached: Tensor | None, task_id: int, train: bool) -> dict[str, Any]:
        if self.kind == "text":
            return self.model(**inputs, task_id=task_id, cls_features=cached, train=train)
        return self.model(inputs, task_id=task_id, cls_features=cached, train=train)

    def end_task(self, info: TaskEnd) -> None:
        super().end_task(info)
        if not self.config.diversity:
            return
        if info.selection_counts is None:
            raise ValueError("diversity: the task's selection counts are needed at its end, got None")
        self.past_counts += torch.as_tensor(info.selection_counts, dtype=torch.int64).cpu()
        self._set_frequency()

    def _set_frequency(self) -> None:
        """The pool's frequency: the normalised selections of the finished tasks (None before any)."""
        total = int(self.past_counts.sum())
        frequency = self.past_counts.double() / total if total > 0 else None
        self.pool.set_prompt_frequency(None if frequency is None else frequency.to(self.pool.prompt.device))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(past_counts=self.past_counts.clone(), shared_task=self.shared_task)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        zeros = torch.zeros_like(self.past_counts)
        self.past_counts = state.get("past_counts", zeros).clone()
        self.shared_task = int(state.get("shared_task", 0))
        if self.config.diversity:
            self._set_frequency()

    def loss(self, out: dict[str, Any], labels: Tensor, class_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss, parts = super().loss(out, labels, class_mask)
        if self.config.pull_lambda:
            loss = loss - self.config.pull_lambda * out["reduce_sim"]
        parts["reduce_sim"] = float(out["reduce_sim"].detach())
        return loss, parts
