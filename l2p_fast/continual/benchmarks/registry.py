"""Benchmarks by name: ``get_benchmark("wordnet20", classes_per_task=4)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import ContinualBenchmark
from .files import image_folder, tensor_file
from .text import wordnet20
from .vision import five_datasets, split_cifar100

BENCHMARKS: dict[str, Callable[..., ContinualBenchmark]] = {
    "wordnet20": wordnet20,
    "split_cifar100": split_cifar100,
    "five_datasets": five_datasets,
    "image_folder": image_folder,
    "tensor_file": tensor_file,
}


def available_benchmarks() -> list[str]:
    """Names accepted by :func:`get_benchmark`."""
    return sorted(BENCHMARKS)


def get_benchmark(name: str, **kwargs: Any) -> ContinualBenchmark:
    """Build the benchmark registered as ``name`` with the loader's keyword arguments."""
    if name not in BENCHMARKS:
        raise ValueError(f"get_benchmark: unknown benchmark name={name!r}; allowed: {available_benchmarks()}")
    return BENCHMARKS[name](**kwargs)
