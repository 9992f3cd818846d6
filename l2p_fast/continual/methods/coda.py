"""``coda-prompt``: CODA-Prompt (Smith et al., CVPR 2023) on the frozen backbone — ``CodaTextEncoder`` for text,
``CodaViT`` for images (``l2p_fast.models.coda_text`` / ``coda_vit``).

The paper's defaults: ``coda_components`` = 100 components over all tasks (⌊100 / T⌋ per task; the last
100 − T·⌊100 / T⌋ rows are never used), prompt length ``coda_length`` = 8 (4 key + 4 value prefix tokens), prompted
layers 0–4 (those that exist on a shallower backbone), orthogonality weight ``ortho_mu`` = 0 (off), the current
task's classes in the training loss (``train_mask`` 'task'). Loss = masked cross-entropy + the orthogonality loss.

Components: Gram–Schmidt makes the used rows orthonormal, so they need a row width of at least their number. MiniLM
(D = 384) and ViT-B (768) take the paper's 100; with ``coda_components`` unset a narrower backbone gets
min(100, D) components; an explicit value too large for the backbone fails when the model is built.

Learning rate: Adam at 0.03 (``METHOD_DEFAULTS``), the rate ``l2p`` and ``dualprompt`` use, so the prompt methods
compare at one setting: the paper's 1e-3 is for 20 epochs at batch 128; on ``wordnet20``'s one-epoch budget (10
steps per task) it barely moves the prompts (seed 0, MiniLM: average accuracy 21.7% at 1e-3, 54.8% at 1e-2, 61.2% at
3e-2).

Tasks: when task t begins (``begin_task``, on every process before its first step) the model moves to task t
(``set_task``: task t's rows get the
Gram–Schmidt initialisation, drawn from a generator seeded by (seed, t), so a resumed run draws the same); the
current task is part of the checkpointed method state. Evaluation uses every row of the tasks so far.
Recorded for the results: ``component_mass_test`` (tasks, M), per task the mean over its test items of |α| per
component, averaged over the prompted layers, from the latest evaluation (rows ≥ F are 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..backbones import Backbone
from .base import Method, TaskEnd

PROMPT_LAYERS = (0, 1, 2, 3, 4)
DEFAULT_COMPONENTS = 100  # the paper's M (CIFAR-100, 10 tasks)


def prompt_layers(depth: int) -> tuple[int, ...]:
    """The paper's layers 0–4 that a backbone of ``depth`` layers has."""
    return tuple(i for i in PROMPT_LAYERS if i < depth)


class CodaPrompt(Method):
    """CODA-Prompt on a frozen text or ViT backbone (see the module docstring)."""

    name = "coda-prompt"
    frozen_backbone = True
    needs_num_tasks = True  # make_method passes the benchmark's number of tasks (the per-task slice of rows)

    def __init__(self, config: Any, backbone: Backbone, num_classes: int, num_tasks: int | None = None) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks: method 'coda-prompt' needs the benchmark's task count, got {num_tasks!r}")
        self.num_tasks = num_tasks
        self.uses_feature_cache = backbone.kind == "text"
        super().__init__(config, backbone, num_classes)
        pool = self.model.prompt.e_pool_size
        self.mass = torch.zeros(num_tasks, pool, dtype=torch.float64)  # Σ over test items of layer-mean |α|
        self.mass_items = torch.zeros(num_tasks, dtype=torch.float64)

    def _generator(self, task: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 100_003 + task)

    def build(self, backbone: Backbone, num_classes: int) -> nn.Module:
        cfg = self.config
        pool = cfg.coda_components if cfg.coda_components is not None else min(DEFAULT_COMPONENTS, backbone.width)
        options = dict(
            n_tasks=self.num_tasks, pool_size=pool, length=cfg.coda_length, ortho_mu=cfg.ortho_mu,
            backend=cfg.backend, generator=self._generator(0),
        )  # fmt: skip
        if backbone.kind == "text":
            from ...models.coda_text import CodaTextEncoder

            model = backbone.copy()
            options["prompt_layer_idx"] = prompt_layers(len(model.encoder.layer))
            return CodaTextEncoder(model, tokenizer=backbone.tokenizer, num_classes=num_classes,
                                   max_length=cfg.max_length, **options)
        from ...models.coda_vit import CodaViT

        model = backbone.copy()
        options["prompt_layer_idx"] = prompt_layers(len(model.blocks))
        return CodaViT.from_timm(model, pretrained=False, num_classes=num_classes, final_tokens="head", **options)

    def begin_task(self, task_id: int) -> None:
        if task_id > self.model.task_count:
            self.model.set_task(task_id, self._generator(task_id))

    def forward(self, inputs: Any, cached: Tensor | None, task_id: int, train: bool) -> dict[str, Any]:
        if self.kind == "text":
            return self.model(**inputs, cls_features=cached, train=train)
        return self.model(inputs, cls_features=cached, train=train)

    def loss(self, out: dict[str, Any], labels: Tensor, class_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss, parts = super().loss(out, labels, class_mask)
        ortho = out["ortho_loss"]
        if self.config.ortho_mu:
            loss = loss + ortho.float()
            parts["ortho"] = float(ortho.detach())
        return loss, parts

    def end_task(self, info: TaskEnd) -> None:
        super().end_task(info)
        self.mass.zero_()  # the evaluation that follows records afresh
        self.mass_items.zero_()

    def observe_eval(self, out: dict[str, Any], tasks: Tensor) -> None:
        """Add the evaluated items' mean-over-layers |α| (L, B, F) to their tasks' rows of the mass."""
        alpha = out["component_weights"].detach().abs().double().mean(0).cpu()  # (B, F)
        self.mass[:, : alpha.shape[1]].index_add_(0, tasks, alpha)
        self.mass_items.index_add_(0, tasks, torch.ones(len(tasks), dtype=torch.float64))

    def finish_eval(self) -> None:
        """Sum the processes' shares of the mass (each process saw only its own test items)."""
        device = next(self.model.parameters()).device  # NCCL sums CUDA tensors only
        shares = torch.cat([self.mass.flatten(), self.mass_items]).to(device)
        summed = distributed.all_reduce_(shares, "summing CODA's component mass").cpu()
        self.mass.copy_(summed[: self.mass.numel()].view_as(self.mass))
        self.mass_items.copy_(summed[self.mass.numel():])

    def results(self) -> dict[str, Any]:
        """``component_mass_test`` (tasks, M): mean |α| per component of each task's test items."""
        return {"component_mass_test": (self.mass / self.mass_items.clamp_min(1).unsqueeze(1)).tolist()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["task_count"] = self.model.task_count
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        task = state.get("task_count")
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"checkpoint of method 'coda-prompt': task_count expected in [0, {self.num_tasks}), "
                             f"got {task!r}")
        self.model.prompt.task_count = task  # the rows themselves come with the model state
