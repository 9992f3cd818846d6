"""The class-balanced rehearsal buffer of ``er`` and ``l2p+er``: ``per_class`` stored examples per seen class."""

from __future__ import annotations

import torch
from torch import Tensor


class ReplayBuffer:
    """Indices into the training pool, ``per_class`` per class, chosen at random when a task ends.

    Only indices are stored (the pool holds the data), so the buffer is tiny in a checkpoint. Sampling
    is uniform over the buffer, which is class-balanced because every class holds the same number
    (fewer only when a class has fewer examples).
    """

    def __init__(self, per_class: int) -> None:
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"per_class: expected a positive int, got {per_class!r}")
        self.per_class = per_class
        self.indices = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def add_task(self, task_indices: Tensor, labels: Tensor, gen: torch.Generator) -> None:
        """Store up to ``per_class`` random examples of each class among ``task_indices`` (labels = pool labels)."""
        chosen = [self.indices]
        task_labels = labels[task_indices]
        for cls in torch.unique(task_labels).tolist():
            members = task_indices[task_labels == cls]
            pick = torch.randperm(len(members), generator=gen)[: self.per_class]
            chosen.append(members[torch.sort(pick).values])
        self.indices = torch.cat(chosen)

    def sample(self, n: int, gen: torch.Generator) -> Tensor:
        """``n`` indices drawn uniformly with replacement (empty when the buffer is)."""
        if len(self.indices) == 0 or n <= 0:
            return torch.empty(0, dtype=torch.long)
        return self.indices[torch.randint(len(self.indices), (n,), generator=gen)]

    def class_counts(self, labels: Tensor) -> dict[int, int]:
        """Stored examples per class label."""
        values, counts = torch.unique(labels[self.indices], return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def state_dict(self) -> dict[str, object]:
        """Checkpointable state (``weights_only``-safe)."""
        return {"per_class": self.per_class, "indices": self.indices.clone()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`; a different ``per_class`` raises ``ValueError``."""
        if state.get("per_class") != self.per_class:
            raise ValueError(
                f"replay buffer: checkpoint has per_class={state.get('per_class')}, run has {self.per_class}"
            )
        indices = state.get("indices")
        if not isinstance(indices, Tensor) or indices.dtype != torch.long or indices.dim() != 1:
            raise ValueError("replay buffer: checkpoint 'indices' must be a 1-D int64 tensor")
        self.indices = indices.clone()
