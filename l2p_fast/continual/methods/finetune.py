"""The baselines on a plain classifier (backbone feature + linear head).

* ``seq``: sequential fine-tuning of the whole model, task after task.
* ``seq-frozen``: sequential training of the head only, on the frozen backbone (text: on cached features).
* ``er``: ``seq`` plus a class-balanced rehearsal buffer (the trainer mixes replayed examples into each batch).
* ``joint``: the whole model trained once on all tasks' data, shuffled together (the i.i.d. upper bound).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..backbones import Backbone, Classifier
from .base import Method


class FineTune(Method):
    """Whole-model fine-tuning (``seq``, ``er``, ``joint``)."""

    name = "seq"

    def build(self, backbone: Backbone, num_classes: int) -> nn.Module:
        return Classifier(backbone.kind, backbone.copy(), backbone.width, num_classes, frozen=False)

    def forward(self, inputs: Any, cached: Tensor | None, task_id: int, train: bool) -> dict[str, Any]:
        return self.model(inputs)


class FrozenFineTune(Method):
    """Head-only training on the frozen backbone (``seq-frozen``); text uses cached features."""

    name = "seq-frozen"
    frozen_backbone = True

    def __init__(self, config: Any, backbone: Backbone, num_classes: int) -> None:
        self.uses_feature_cache = backbone.kind == "text"
        self.needs_inputs = not self.uses_feature_cache
        super().__init__(config, backbone, num_classes)

    def build(self, backbone: Backbone, num_classes: int) -> nn.Module:
        return Classifier(backbone.kind, backbone.copy(), backbone.width, num_classes, frozen=True)

    def forward(self, inputs: Any, cached: Tensor | None, task_id: int, train: bool) -> dict[str, Any]:
        return self.model(inputs, features=cached)
