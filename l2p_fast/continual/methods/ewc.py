"""Elastic weight consolidation (Kirkpatrick et al., 2017), online form, on the whole fine-tuned model.

After task t the diagonal Fisher F_t is estimated from squared mini-batch gradients of the training
loss on ``fisher_samples`` examples of the task (``batch · mean(g²)``, the usual batched estimate of
the per-example expectation); the Fishers of all tasks so far are summed and anchored at the
parameters θ* after the latest task. The penalty added to the loss is ``λ/2 · Σ F (θ − θ*)²``.
On several processes each mini-batch's gradient is summed over the processes before it is squared
(``TaskEnd.backward_on``), so the Fisher is the one-process Fisher and the same on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import TaskEnd
from .finetune import FineTune


class EWC(FineTune):
    """``seq`` plus the EWC penalty."""

    name = "ewc"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def _named(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def penalty(self) -> Tensor | None:
        """``λ/2 · Σ F (θ − θ*)²`` (None before the first task ends)."""
        if not self.fisher:
            return None
        total = None
        for name, param in self._named().items():
            term = (self.fisher[name] * (param - self.anchor[name]).pow(2)).sum()
            total = term if total is None else total + term
        return 0.5 * self.config.ewc_lambda * total

    def loss(self, out: dict[str, Any], labels: Tensor, class_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss, parts = super().loss(out, labels, class_mask)
        penalty = self.penalty()
        if penalty is not None:
            loss = loss + penalty
            parts["ewc"] = float(penalty.detach())
        return loss, parts

    def end_task(self, info: TaskEnd) -> None:
        super().end_task(info)
        params = self._named()
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        order = info.indices[torch.randperm(len(info.indices), generator=info.gen)][: self.config.fisher_samples]
        batches = list(order.split(self.config.batch_size))
        for batch in batches:
            self.model.zero_grad(set_to_none=True)
            info.backward_on(batch)
            for name, param in params.items():
                if param.grad is not None:
                    fisher[name] += param.grad.detach().pow(2) * len(batch)
        self.model.zero_grad(set_to_none=True)
        for name in fisher:
            fisher[name] /= len(batches)
            self.fisher[name] = self.fisher[name] + fisher[name] if name in self.fisher else fisher[name]
            self.anchor[name] = params[name].detach().clone()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fisher"] = {k: v.clone() for k, v in self.fisher.items()}
        state["anchor"] = {k: v.clone() for k, v in self.anchor.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        fisher, anchor = state.get("fisher"), state.get("anchor")
        if not isinstance(fisher, dict) or not isinstance(anchor, dict) or set(fisher) != set(anchor):
            raise ValueError("checkpoint of method 'ewc' lacks consistent 'fisher' and 'anchor' tensors")
        params = self._named()
        if fisher and set(fisher) != set(params):
            raise ValueError("checkpoint of method 'ewc': its Fisher covers other parameters than the model's")
        for name in fisher:
            for kind, value in (("fisher", fisher[name]), ("anchor", anchor[name])):
                if not isinstance(value, Tensor) or value.shape != params[name].shape:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"checkpoint of method 'ewc': {kind} of {name!r} has shape {shape}, the parameter "
                                     f"{tuple(params[name].shape)}")
        self.fisher = {k: v.clone() for k, v in fisher.items()}
        self.anchor = {k: v.clone() for k, v in anchor.items()}
