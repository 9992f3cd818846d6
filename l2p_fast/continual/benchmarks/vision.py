"""Image benchmarks from torchvision data sets: Split CIFAR-100 and 5-datasets.

Both need the data on disk (``download=True`` fetches it, which needs the network). The data-set
classes are looked up through a factory table, so tests run the same code on tiny stand-ins.
Transforms follow the L2P setup: train ``RandomResizedCrop(size, scale=(0.05, 1))`` +
``RandomHorizontalFlip`` + ``ToTensor``; test ``Resize(size * 256 / 224, bicubic)`` +
``CenterCrop(size)`` + ``ToTensor`` (for ``size <= 32`` a plain ``Resize((size, size))``, so that
28x28 digits and 32x32 CIFAR images share one shape; see :mod:`.transforms`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset

from .base import ContinualBenchmark, build_benchmark, dataset_labels, resolve_class_order
from .files import folder_dataset
from .transforms import default_transforms

# factory(root, train, download, transform) -> data set with labels in .targets / .labels
DatasetFactory = Callable[[str, bool, bool, Any], Any]

FIVE_DATASETS = ("svhn", "mnist", "cifar10", "notmnist", "fashion_mnist")


def _torchvision(cls_name: str) -> DatasetFactory:
    def make(root: str, train: bool, download: bool, transform: Any) -> Any:
        from torchvision import datasets

        cls = getattr(datasets, cls_name)
        if cls_name == "SVHN":
            return cls(root, split="train" if train else "test", download=download, transform=transform)
        return cls(root, train=train, download=download, transform=transform)

    return make


def _notmnist(root: str, train: bool, download: bool, transform: Any) -> Any:
    """notMNIST is not in torchvision: expects ``root/notMNIST/{Train,Test}/<A..J>/*.png``."""
    folder = Path(root) / "notMNIST" / ("Train" if train else "Test")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"notMNIST not found at {folder} (torchvision cannot download it; download=True does not help): "
            "place the extracted notMNIST set there, one folder per letter"
        )
    return folder_dataset(folder, transform)


DATASET_FACTORIES: dict[str, DatasetFactory] = {
    "cifar100": _torchvision("CIFAR100"),
    "cifar10": _torchvision("CIFAR10"),
    "mnist": _torchvision("MNIST"),
    "fashion_mnist": _torchvision("FashionMNIST"),
    "svhn": _torchvision("SVHN"),
    "notmnist": _notmnist,
}


def class_names_of(dataset: Any, labels: Sequence[int]) -> list[str]:
    """``dataset.classes`` if present, else the label ids as strings."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return [str(c) for c in classes]
    return [str(i) for i in range(max(labels) + 1)]


def _load_pair(
    name: str,
    root: str | Path,
    download: bool,
    transforms: tuple[Any, Any],
    factories: Mapping[str, DatasetFactory] | None,
) -> tuple[Any, Any]:
    table = {**DATASET_FACTORIES, **(factories or {})}
    if name not in table:
        raise ValueError(f"unknown data set {name!r}; allowed: {sorted(table)}")
    make = table[name]
    return make(str(root), True, download, transforms[0]), make(str(root), False, download, transforms[1])


def _resolve_transforms(image_size: int, train_transform: Any, test_transform: Any) -> tuple[Any, Any]:
    if train_transform is None or test_transform is None:
        train, test = default_transforms(image_size)
        train_transform = train if train_transform is None else train_transform
        test_transform = test if test_transform is None else test_transform
    return train_transform, test_transform


def split_cifar100(
    root: str | Path = "data",
    download: bool = False,
    image_size: int = 224,
    num_tasks: int = 10,
    class_order: Sequence[int | str] | None = None,
    seed: int | None = None,
    train_transform: Any = None,
    test_transform: Any = None,
    factories: Mapping[str, DatasetFactory] | None = None,
) -> ContinualBenchmark:
    """Split CIFAR-100: ``num_tasks`` tasks of ``100 / num_tasks`` classes (natural order by default)."""
    transforms = _resolve_transforms(image_size, train_transform, test_transform)
    train, test = _load_pair("cifar100", root, download, transforms, factories)
    train_labels, test_labels = dataset_labels(train), dataset_labels(test)
    classes = class_names_of(train, train_labels)
    order = resolve_class_order(classes, class_order, seed)
    if int(num_tasks) != num_tasks or num_tasks < 1 or len(order) % num_tasks:
        raise ValueError(
            f"num_tasks={num_tasks!r} must be a positive divisor of the number of classes ({len(order)})"
        )
    return build_benchmark(
        "split_cifar100",
        classes,
        train,
        test,
        order,
        len(order) // num_tasks,
        "image",
        train_labels=train_labels,
        test_labels=test_labels,
    )


def five_datasets(
    root: str | Path = "data",
    download: bool = False,
    image_size: int = 224,
    datasets: Sequence[str] = FIVE_DATASETS,
    seed: int | None = None,
    train_transform: Any = None,
    test_transform: Any = None,
    factories: Mapping[str, DatasetFactory] | None = None,
) -> ContinualBenchmark:
    """5-datasets: one task per data set, labels offset so that all classes are distinct.

    Default order as in the L2P port (SVHN, MNIST, CIFAR-10, notMNIST, Fashion-MNIST); ``seed``
    shuffles the data-set order. Class names are ``"<data set>/<class>"``.
    """
    names = list(datasets)
    if not names:
        raise ValueError("datasets must name at least one data set")
    if seed is not None:
        random.Random(seed).shuffle(names)
    transforms = _resolve_transforms(image_size, train_transform, test_transform)
    train_parts, test_parts, sizes = [], [], []
    class_names: list[str] = []
    train_labels: list[int] = []
    test_labels: list[int] = []
    for name in names:
        train, test = _load_pair(name, root, download, transforms, factories)
        tr_labels, te_labels = dataset_labels(train), dataset_labels(test)
        classes = class_names_of(train, tr_labels)
        offset = len(class_names)
        train_labels += [y + offset for y in tr_labels]
        test_labels += [y + offset for y in te_labels]
        class_names += [f"{name}/{c}" for c in classes]
        train_parts.append(train)
        test_parts.append(test)
        sizes.append(len(classes))
    order = list(range(len(class_names)))
    return build_benchmark(
        "five_datasets",
        class_names,
        ConcatDataset(train_parts),
        ConcatDataset(test_parts),
        order,
        sizes,
        "image",
        train_labels=train_labels,
        test_labels=test_labels,
    )
