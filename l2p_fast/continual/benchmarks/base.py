"""The class-incremental benchmark description and the one function that splits data into tasks.

Every loader ends in :func:`build_benchmark`: given a train and a test source (any indexable data
set whose items are ``(x, original_label, ...)``), their original labels, a class order and the
task sizes, it returns per-task train/test views whose labels are **positions in the class
order**, so with ``C`` classes per task, task ``t`` owns labels ``t*C .. t*C + C - 1``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import ConcatDataset, Dataset

Modality = Literal["text", "image", "tensor"]


class LabelledSubset(Dataset):
    """Items ``indices`` of ``source`` as ``(x, label)``; ``labels[i]`` replaces the source's label."""

    def __init__(self, source: Any, indices: Sequence[int], labels: Sequence[int]) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"indices ({len(indices)}) and labels ({len(labels)}) differ in length")
        self.source = source
        self.indices = list(indices)
        self.targets = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        item = self.source[self.indices[i]]
        return item[0], self.targets[i]

    def describe(self, i: int) -> str:
        """A readable name of item ``i`` (its file, or its row in the source) for error messages."""
        describe = getattr(self.source, "describe", None)
        return describe(self.indices[i]) if describe is not None else f"source item {self.indices[i]}"


@dataclass(frozen=True)
class ContinualBenchmark:
    """A class-incremental task sequence.

    ``class_names`` and ``class_order`` use the source's original class ids; ``tasks[t]`` lists
    the original ids learned in task ``t`` (consecutive chunks of ``class_order``). The data sets
    ``train[t]`` / ``test[t]`` yield ``(x, label)`` with ``label`` = position of the class in
    ``class_order``; :meth:`task_labels` gives those remapped labels per task.
    """

    name: str
    class_names: list[str]
    class_order: list[int]
    tasks: list[list[int]]
    train: list[Dataset]
    test: list[Dataset]
    modality: Modality

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        """Number of classes in the whole sequence (the size of the final head)."""
        return len(self.class_order)

    @property
    def ordered_class_names(self) -> list[str]:
        """Class names indexed by remapped label."""
        return [self.class_names[c] for c in self.class_order]

    def task_labels(self, task: int) -> list[int]:
        """Remapped labels of task ``task``'s classes (a contiguous range)."""
        start = sum(len(c) for c in self.tasks[:task])
        return list(range(start, start + len(self.tasks[task])))

    def num_seen_classes(self, task: int) -> int:
        """Number of classes seen after training on tasks ``0..task``."""
        return sum(len(c) for c in self.tasks[: task + 1])

    def test_up_to(self, task: int) -> Dataset:
        """The union of the test sets of tasks ``0..task`` (class-incremental evaluation)."""
        return ConcatDataset(self.test[: task + 1])

    def describe(self) -> str:
        """One line per task: classes and sizes."""
        lines = [f"{self.name}: {self.num_tasks} tasks, {self.num_classes} classes ({self.modality})"]
        for t, classes in enumerate(self.tasks):
            names = ", ".join(self.class_names[c] for c in classes)
            lines.append(f"  task {t}: train {len(self.train[t])}, test {len(self.test[t])}: {names}")
        return "\n".join(lines)


def resolve_class_order(
    class_names: Sequence[str],
    class_order: Sequence[int | str] | None = None,
    seed: int | None = None,
) -> list[int]:
    """Class ids in learning order.

    ``class_order`` may name classes by id or by name and may select a subset. Without it the
    natural order is used, shuffled with ``random.Random(seed)`` when ``seed`` is given.
    """
    num = len(class_names)
    if class_order is None:
        order = list(range(num))
        if seed is not None:
            random.Random(seed).shuffle(order)
        return order
    if seed is not None:
        raise ValueError("give either class_order or seed, not both")
    by_name = {name: i for i, name in enumerate(class_names)}
    ids: list[int] = []
    for c in class_order:
        if isinstance(c, str):
            if c not in by_name:
                raise ValueError(f"class_order names unknown class {c!r}; known: {list(class_names)}")
            ids.append(by_name[c])
        else:
            if int(c) != c or not 0 <= c < num:
                raise ValueError(f"class_order entry {c!r} is not a class id in [0, {num - 1}]")
            ids.append(int(c))
    if not ids:
        raise ValueError("class_order is empty")
    if len(set(ids)) != len(ids):
        raise ValueError(f"class_order repeats a class: {list(class_order)}")
    return ids


def split_tasks(class_order: Sequence[int], classes_per_task: int | Sequence[int]) -> list[list[int]]:
    """Cut ``class_order`` into consecutive tasks of ``classes_per_task`` classes (int or per-task list)."""
    n = len(class_order)
    if isinstance(classes_per_task, int):
        if classes_per_task < 1 or n % classes_per_task:
            raise ValueError(
                f"classes_per_task={classes_per_task} must be a positive divisor of the "
                f"number of classes ({n})"
            )
        sizes = [classes_per_task] * (n // classes_per_task)
    else:
        sizes = [int(s) for s in classes_per_task]
        if not sizes or min(sizes) < 1 or sum(sizes) != n:
            raise ValueError(f"classes_per_task={list(classes_per_task)} must be positive and sum to {n}")
    tasks, start = [], 0
    for size in sizes:
        tasks.append(list(class_order[start : start + size]))
        start += size
    return tasks


def dataset_labels(dataset: Any) -> list[int]:
    """Original labels of a data set: ``.targets`` or ``.labels`` if present, else item ``[1]``."""
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            if isinstance(values, torch.Tensor):
                return [int(v) for v in values.tolist()]
            return [int(v) for v in values]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def check_class_names(source: str, class_names: Any) -> None:
    """``ValueError`` unless ``class_names`` is a list or tuple of distinct strings (a string is refused)."""
    if not isinstance(class_names, list | tuple) or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"{source}: classes must be a list of class-name strings, got {class_names!r}"[:300])
    repeated = sorted(c for c, n in Counter(class_names).items() if n > 1)
    if repeated:
        raise ValueError(f"{source}: class names must be distinct, {repeated} appear more than once")


def build_benchmark(
    name: str,
    class_names: Sequence[str],
    train_source: Any,
    test_source: Any,
    class_order: Sequence[int],
    classes_per_task: int | Sequence[int],
    modality: Modality,
    train_labels: Sequence[int] | None = None,
    test_labels: Sequence[int] | None = None,
) -> ContinualBenchmark:
    """Split ``train_source`` / ``test_source`` into tasks with labels remapped to class-order positions.

    ``class_names`` must be distinct strings (a ``ValueError`` names the repeated ones).
    """
    check_class_names(name, class_names)
    order = list(class_order)
    tasks = split_tasks(order, classes_per_task)
    position = {c: p for p, c in enumerate(order)}
    task_of = {c: t for t, classes in enumerate(tasks) for c in classes}

    def split(source: Any, given: Sequence[int] | None, split_name: str) -> list[Dataset]:
        labels = dataset_labels(source) if given is None else [int(y) for y in given]
        if len(labels) != len(source):
            raise ValueError(f"{name}: {len(labels)} {split_name} labels for {len(source)} items")
        indices: list[list[int]] = [[] for _ in tasks]
        new_labels: list[list[int]] = [[] for _ in tasks]
        for i, y in enumerate(labels):
            t = task_of.get(y)
            if t is not None:
                indices[t].append(i)
                new_labels[t].append(position[y])
        missing = sorted(set(order) - set(labels))
        if missing:
            names = [class_names[c] for c in missing]
            raise ValueError(f"{name}: no {split_name} examples for classes {names}")
        return [LabelledSubset(source, idx, lab) for idx, lab in zip(indices, new_labels, strict=True)]

    return ContinualBenchmark(
        name=name,
        class_names=list(class_names),
        class_order=order,
        tasks=tasks,
        train=split(train_source, train_labels, "train"),
        test=split(test_source, test_labels, "test"),
        modality=modality,
    )
