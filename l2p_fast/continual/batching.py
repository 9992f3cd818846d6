"""A benchmark split flattened into one indexable pool, and the deterministic batch orders of a run.

Text is tokenized once (truncated at ``max_length``, unpadded); a batch is padded to its longest
member. Training batches come from a seeded permutation cut into buckets of similar length (less
padding, same randomness on every run and after a resume); evaluation batches are sorted by length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .benchmarks import ContinualBenchmark

BUCKET_BATCHES = 8  # a training bucket holds this many batches of similar length


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (e.g. ``(seed, "epoch", task, epoch)``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass
class Pool:
    """Every example of one split: item ``i`` has ``labels[i]`` (class-order position) and ``tasks[i]``.

    Text pools hold token ids (``tokens``, ``lengths``, ``pad_id``); other pools read items from
    the per-task data sets (``sources``, ``offsets``).
    """

    labels: Tensor
    tasks: Tensor
    tokens: list[list[int]] | None = None
    lengths: Tensor | None = None
    pad_id: int = 0
    sources: list[Any] | None = None
    offsets: list[int] | None = None
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def task_indices(self, task: int | Sequence[int]) -> Tensor:
        """Indices of the items of one task (or of several), in order."""
        wanted = torch.tensor([task] if isinstance(task, int) else list(task), dtype=torch.long)
        return torch.nonzero(torch.isin(self.tasks, wanted)).flatten()

    def item(self, index: int, seed: int | None = None) -> Tensor:
        """Item ``index`` of an image pool as a tensor; ``seed`` fixes its random augmentation (drawn under a
        forked global RNG seeded with it, so the caller's RNG is untouched); None draws from the global RNG."""
        task = int(self.tasks[index])
        if seed is None:
            x = self.sources[task][index - self.offsets[task]][0]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.sources[task][index - self.offsets[task]][0]
        return x if isinstance(x, Tensor) else torch.as_tensor(x)

    def collate(self, indices: Tensor, device: torch.device | str = "cpu", seeds: Tensor | None = None) -> Any:
        """Model inputs of the items ``indices``: ``{input_ids, attention_mask}`` (text) or a stacked tensor;
        ``seeds`` (len(indices),): per-item augmentation seeds of an image pool (see :meth:`item`)."""
        if self.tokens is not None:
            rows = [self.tokens[i] for i in indices.tolist()]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, row in enumerate(rows):
                ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[j, : len(row)] = 1
            return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        keys = seeds.tolist() if seeds is not None else [None] * len(indices)
        items = [self.item(i, s) for i, s in zip(indices.tolist(), keys, strict=True)]
        return torch.stack(items).float().to(device)

    def describe(self, indices: Tensor, limit: int = 8) -> str:
        """Readable names of the items ``indices`` (at most ``limit``): pool index plus file name, data-set
        row or the start of the text, for error messages."""
        names = []
        for i in indices[:limit].tolist():
            if self.texts is not None:
                names.append(f"#{i} {self.texts[i][:40]!r}")
            elif self.sources is not None:
                task = int(self.tasks[i])
                source = self.sources[task]
                j = i - self.offsets[task]
                describe = getattr(source, "describe", None)
                names.append(f"#{i} ({describe(j) if describe is not None else f'task {task} item {j}'})")
            else:
                names.append(f"#{i}")
        more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
        return ", ".join(names) + more

    def fingerprint(self) -> str:
        """SHA-1 of the content (token ids / labels), for the feature cache's file name."""
        digest = hashlib.sha1(self.labels.numpy().tobytes())
        digest.update(self.tasks.numpy().tobytes())
        if self.tokens is not None:
            for row in self.tokens:
                digest.update(repr(row).encode())
        return digest.hexdigest()


def build_pool(benchmark: ContinualBenchmark, split: str, tokenizer: Any = None, max_length: int = 32) -> Pool:
    """Flatten ``benchmark.train`` or ``.test`` into a :class:`Pool` (text is tokenized with ``tokenizer``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    datasets = getattr(benchmark, split)
    labels: list[int] = []
    tasks: list[int] = []
    for t, ds in enumerate(datasets):
        targets = getattr(ds, "targets", None)
        targets = list(targets) if targets is not None else [int(ds[i][1]) for i in range(len(ds))]
        labels += [int(y) for y in targets]
        tasks += [t] * len(targets)
    label_tensor = torch.tensor(labels, dtype=torch.long)
    task_tensor = torch.tensor(tasks, dtype=torch.long)
    if benchmark.modality == "text":
        if tokenizer is None:
            raise ValueError("tokenizer: a text benchmark needs the backbone's tokenizer, got None")
        texts = [ds[i][0] for ds in datasets for i in range(len(ds))]
        encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
        tokens = [list(map(int, row)) for row in encoded]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        lengths = torch.tensor([len(r) for r in tokens], dtype=torch.long)
        return Pool(label_tensor, task_tensor, tokens=tokens, lengths=lengths, pad_id=int(pad), texts=texts)
    offsets, start = [], 0
    for ds in datasets:
        offsets.append(start)
        start += len(ds)
    return Pool(label_tensor, task_tensor, sources=list(datasets), offsets=offsets)


def train_batches(
    indices: Tensor, batch_size: int, gen: torch.Generator, lengths: Tensor | None = None
) -> list[Tensor]:
    """One epoch of training batches of ``indices``, in a random order drawn from ``gen``.

    With ``lengths`` the permutation is cut into buckets of ``BUCKET_BATCHES`` batches, each bucket
    sorted by length before it is split, and the batch order shuffled again (bucketing).
    """
    perm = indices[torch.randperm(len(indices), generator=gen)]
    if lengths is None:
        return list(perm.split(batch_size))
    batches: list[Tensor] = []
    for bucket in perm.split(batch_size * BUCKET_BATCHES):
        order = torch.sort(lengths[bucket], stable=True).indices
        batches += list(bucket[order].split(batch_size))
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


def eval_batches(indices: Tensor, batch_size: int, lengths: Tensor | None = None) -> list[Tensor]:
    """Evaluation batches of ``indices``: sorted by length when ``lengths`` is given (least padding)."""
    if lengths is not None:
        indices = indices[torch.sort(lengths[indices], stable=True).indices]
    return list(indices.split(batch_size))
