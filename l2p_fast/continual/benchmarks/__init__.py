"""Class-incremental benchmarks: task splitting, built-in loaders and the name registry."""

from .base import ContinualBenchmark, LabelledSubset, build_benchmark, resolve_class_order, split_tasks
from .files import image_folder, tensor_file
from .registry import BENCHMARKS, available_benchmarks, get_benchmark
from .text import TextDataset, wordnet20
from .transforms import default_transforms
from .validation import validation_split
from .vision import five_datasets, split_cifar100

__all__ = [
    "BENCHMARKS",
    "ContinualBenchmark",
    "LabelledSubset",
    "TextDataset",
    "available_benchmarks",
    "build_benchmark",
    "default_transforms",
    "five_datasets",
    "get_benchmark",
    "image_folder",
    "resolve_class_order",
    "split_cifar100",
    "split_tasks",
    "tensor_file",
    "validation_split",
    "wordnet20",
]
