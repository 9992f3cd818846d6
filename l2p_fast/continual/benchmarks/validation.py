"""The validation split: a held-out part of each task's training data, for choosing hyper-parameters.

:func:`validation_split` returns the benchmark with ``train[t]`` reduced to the kept part and
``test[t]`` replaced by the held-out part, so a run evaluates on it exactly as it would on the test
set; the test set itself is never read. Per class, the held-out items are the first
``ceil(fraction · n)`` of the class's training items in an order shuffled by a fixed seed
(``VALIDATION_SEED``), so the split depends only on the data and the fraction: the same for
every method, run seed and class order. At least one item per class stays in training.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

from .base import ContinualBenchmark, LabelledSubset, dataset_labels

VALIDATION_SEED = 20261207


def validation_split(benchmark: ContinualBenchmark, fraction: float) -> ContinualBenchmark:
    """``benchmark`` with each task's training data cut into train (kept) and test (held out, ``fraction``).

    ``fraction`` in (0, 1); a class with n training items holds out ``ceil(fraction · n)``, at most n − 1.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction: expected a number in (0, 1), got {fraction!r}")
    train, held_out = [], []
    for t, data in enumerate(benchmark.train):
        labels = dataset_labels(data)
        by_class: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(labels):
            by_class[y].append(i)
        kept_idx: list[int] = []
        held_idx: list[int] = []
        for y in sorted(by_class):
            items = list(by_class[y])
            if len(items) < 2:
                raise ValueError(
                    f"validation_fraction: class {benchmark.ordered_class_names[y]!r} of task {t} has "
                    f"{len(items)} training item(s); a validation split needs at least 2 per class"
                )
            random.Random(f"{VALIDATION_SEED}-{benchmark.class_order[y]}-{len(items)}").shuffle(items)
            count = min(max(1, math.ceil(fraction * len(items))), len(items) - 1)
            held_idx += sorted(items[:count])
            kept_idx += sorted(items[count:])
        kept_idx.sort()
        held_idx.sort()
        train.append(LabelledSubset(data, kept_idx, [labels[i] for i in kept_idx]))
        held_out.append(LabelledSubset(data, held_idx, [labels[i] for i in held_idx]))
    return ContinualBenchmark(
        name=benchmark.name,
        class_names=benchmark.class_names,
        class_order=benchmark.class_order,
        tasks=benchmark.tasks,
        train=train,
        test=held_out,
        modality=benchmark.modality,
    )
