"""Batches of model inputs for a list of pool batches, loaded and decoded in parallel worker processes.

Every training item's random augmentation is drawn from its own seed (:func:`item_seeds`, derived
from the run seed, phase, epoch, step and position), not from the global RNG, so a run gives the
same numbers with any number of workers and after a resume. ``num_workers = 0`` loads in the
calling process; more start a ``torch.utils.data.DataLoader`` per epoch whose workers decode and
augment the next batches while the model trains (``prefetch_factor`` batches ahead per worker).
Text pools are tokenized already and always collate in the calling process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .batching import Pool, generator

PREFETCH = 2  # batches each worker prepares ahead


def item_seeds(seed: int, phase: int, epoch: int, step: int, size: int) -> Tensor:
    """(size,) int64 seeds of the augmentations of one training batch's items."""
    return torch.randint(0, 2**62, (size,), generator=generator(seed, "augment", phase, epoch, step))


class _PoolItems(Dataset):
    """Items of an image pool keyed by ``(index, seed)``: the seed (or -1 for none) fixes the augmentation."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, key: tuple[int, int]) -> Tensor:
        index, seed = key
        return self.pool.item(index, None if seed < 0 else seed)


def _stack(items: list[Tensor]) -> Tensor:
    return torch.stack(items).float()


def load_batches(pool: Pool, batches: Sequence[Tensor], seeds: Sequence[Tensor | None], device: torch.device,
                 num_workers: int = 0) -> Iterator[object]:  # fmt: skip
    """The model inputs of each batch of ``batches`` (pool indices), in order, on ``device``.

    ``seeds[j]``: the per-item augmentation seeds of batch ``j`` (None: the global RNG, e.g. for
    deterministic test transforms). ``num_workers``: worker processes for image pools. An empty batch
    (a process's share of a global batch smaller than the number of processes) gives None.
    """
    if len(seeds) != len(batches):
        raise ValueError(f"seeds: expected one entry per batch ({len(batches)}), got {len(seeds)}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an integer >= 0, got {num_workers!r}")
    if pool.tokens is not None or num_workers == 0:
        for batch, batch_seeds in zip(batches, seeds, strict=True):
            yield pool.collate(batch, device, seeds=batch_seeds) if len(batch) else None
        return
    keys = [
        list(zip(b.tolist(), (s.tolist() if s is not None else [-1] * len(b)), strict=True))
        for b, s in zip(batches, seeds, strict=True) if len(b)
    ]
    loader = iter(DataLoader(_PoolItems(pool), batch_sampler=keys, num_workers=num_workers, collate_fn=_stack,
                             prefetch_factor=PREFETCH, pin_memory=device.type == "cuda"))
    for batch in batches:
        yield next(loader).to(device, non_blocking=True) if len(batch) else None
