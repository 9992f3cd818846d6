"""What every method shares: the model, the masked cross-entropy, replay, and checkpointable state.

A method owns one model (built from a deep copy of the shared backbone) and says how a batch goes
through it (:meth:`Method.forward`), what its loss is (:meth:`Method.loss`) and what happens when
a task ends (:meth:`Method.end_task`). The trainer owns the loop, the optimiser and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import Backbone
from ..config import REPLAY_METHODS, RunConfig
from .replay import ReplayBuffer


@dataclass
class TaskEnd:
    """What :meth:`Method.end_task` may use: the task's pool indices, pool labels, a seeded generator, and
    ``backward_on(indices)``, which adds to the trainable parameters' ``.grad`` the gradient of the method's
    cross-entropy (mean over the pool items ``indices``), computed by every process on its share of the
    items and summed over them (for EWC's Fisher); every process calls it with the same ``indices``."""

    task: int
    indices: Tensor
    labels: Tensor
    gen: torch.Generator
    backward_on: Callable[[Tensor], None]
    selection_counts: Tensor | None = None  # (M,) prompt ids chosen for the task's training rows, all processes


class Method:
    """Base class. Subclasses implement :meth:`build` and may override the hooks."""

    name = "base"
    uses_prompts = False
    frozen_backbone = False  # checkpoints then hold only the trainable parameters
    uses_feature_cache = False  # text: the trainer passes cached backbone features as ``cached``
    needs_inputs = True  # False: training/eval run on cached features alone (no tokens collated)

    def __init__(self, config: RunConfig, backbone: Backbone, num_classes: int) -> None:
        self.config = config
        self.kind = backbone.kind
        self.num_classes = num_classes
        self.model = self.build(backbone, num_classes)
        self.buffer = ReplayBuffer(config.buffer_per_class) if config.method in REPLAY_METHODS else None

    def build(self, backbone: Backbone, num_classes: int) -> nn.Module:
        """The method's model."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, inputs: Any, cached: Tensor | None, task_id: int, train: bool) -> dict[str, Any]:
        """The model's output dict (at least ``logits`` (B, C))."""
        raise NotImplementedError

    def loss(self, out: dict[str, Any], labels: Tensor, class_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy over the classes allowed by ``class_mask`` (C,) bool; returns (loss, logged parts).

        Computed in fp32 whatever the forward's autocast dtype."""
        logits = out["logits"].float().masked_fill(~class_mask, float("-inf"))
        ce = F.cross_entropy(logits, labels)
        return ce, {"ce": float(ce.detach())}

    def begin_task(self, task_id: int) -> None:
        """Called on every process before the first training step of a task's phase, and again when a run resumes
        inside it (so it must be idempotent): where per-task state changes (CODA's new components, L2P's shared
        prompts). A no-op by default."""

    def end_task(self, info: TaskEnd) -> None:
        """Called after training on a task (before its evaluation): fills the replay buffer."""
        if self.buffer is not None:
            self.buffer.add_task(info.indices, info.labels, info.gen)

    def observe_eval(self, out: dict[str, Any], tasks: Tensor) -> None:
        """Called on every evaluation batch with the model's output and the items' tasks (B,) (CODA records its
        component weights); a no-op by default."""

    def finish_eval(self) -> None:
        """Called on every process once an evaluation's batches are done (after the trainer sums its counts over
        the processes): a method that recorded per-process evaluation statistics sums them here; a no-op by
        default."""

    def results(self) -> dict[str, Any]:
        """Extra entries of the run's results (from the latest evaluation); none by default."""
        return {}

    def model_state(self) -> dict[str, Tensor]:
        """The model tensors a checkpoint holds: trainable ones only when the backbone is frozen."""
        state = self.model.state_dict()
        if not self.frozen_backbone:
            return state
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in names}

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`model_state`; missing or unexpected names raise ``ValueError``."""
        expected = set(self.model_state())
        got = set(state)
        if expected != got:
            raise ValueError(
                f"checkpoint model state does not match method {self.name!r}: "
                f"missing {sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}"
            )
        current = self.model.state_dict()
        for key, value in state.items():
            if tuple(value.shape) != tuple(current[key].shape):
                raise ValueError(
                    f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, "
                    f"model expects {tuple(current[key].shape)}"
                )
        self.model.load_state_dict(state, strict=False)

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the model (replay buffer, EWC statistics)."""
        return {"buffer": self.buffer.state_dict() if self.buffer is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.buffer is not None:
            if state.get("buffer") is None:
                raise ValueError(f"checkpoint of method {self.name!r} lacks the replay buffer")
            self.buffer.load_state_dict(state["buffer"])
