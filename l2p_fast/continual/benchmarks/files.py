"""Bring-your-own benchmarks: a folder of images per class, or a tensor / text file.

``image_folder(root)`` accepts ``root/<class>/*.png`` (split into train/test by a fixed seeded
fraction per class) or ``root/train/<class>/...`` + ``root/test/<class>/...``.

Image files of any size and colour mode are converted to RGB and resized by the transforms
(:mod:`.transforms`); a file that cannot be decoded (empty, garbled, not an image, truncated) is a
``ValueError`` naming it, when it is first read.

``tensor_file(path)`` accepts a ``.pt``/``.pth`` holding
``{"train": {"x": Tensor[N, ...], "y": Tensor[N]}, "test": {...}, "classes": [...] (optional)}``
or a text file in the JSON / JSON-lines format of :mod:`.text`. ``y``: integer labels (not bool).
``x``: floating point, used as stored, or uint8, scaled to [0, 1] (divided by 255) when read; other
dtypes are refused. Images are used as stored (not resized): the trainer checks they are
``3 x H x W`` of the backbone's size. ``classes``: a list of distinct names.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .base import ContinualBenchmark, build_benchmark, resolve_class_order
from .text import load_text_json, text_benchmark
from .transforms import default_transforms

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
TEXT_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


class ImageFileDataset(Dataset):
    """Image files with labels; items are ``(transform(PIL RGB image), label)``."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int],
        transform: Any = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"paths ({len(paths)}) and labels ({len(labels)}) differ in length")
        self.paths = [Path(p) for p in paths]
        self.targets = [int(y) for y in labels]
        self.transform = transform
        if classes is not None:
            self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as img:
                image = img.convert("RGB")
        except Exception as error:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBomb...
            raise ValueError(
                f"image_folder: cannot read image {str(self.paths[i])!r} ({type(error).__name__}: {error}); "
                "remove or replace the file"
            ) from error
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]

    def describe(self, i: int) -> str:
        """The file of item ``i``."""
        return str(self.paths[i])


class TensorPairDataset(Dataset):
    """Rows of ``x`` with integer labels ``y``; items are ``(x[i], int(y[i]))``, uint8 rows as float32 / 255.

    ``origin`` names the data in messages (e.g. ``"data.pt train"``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, origin: str = "tensor") -> None:
        self.x = x
        self.targets = [int(v) for v in y.tolist()]
        self.origin = origin

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.x[i]
        return (row.float() / 255 if row.dtype == torch.uint8 else row), self.targets[i]

    def describe(self, i: int) -> str:
        """Item ``i`` as ``origin row i``."""
        return f"{self.origin} row {i}"


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_dataset(
    folder: str | Path, transform: Any = None, classes: Sequence[str] | None = None
) -> ImageFileDataset:
    """``folder/<class>/<images>`` as an :class:`ImageFileDataset` (classes sorted by name unless given)."""
    folder = Path(folder)
    names = list(classes) if classes is not None else [d.name for d in _class_dirs(folder)]
    index = {name: i for i, name in enumerate(names)}
    paths: list[Path] = []
    labels: list[int] = []
    for d in _class_dirs(folder):
        if d.name not in index:
            raise ValueError(f"{d} is not one of the classes {names}")
        files = _image_files(d)
        paths += files
        labels += [index[d.name]] * len(files)
    return ImageFileDataset(paths, labels, transform, names)


def _split_subfolders(root: Path) -> tuple[Path, Path] | None:
    by_lower = {d.name.lower(): d for d in _class_dirs(root)}
    if "train" in by_lower and "test" in by_lower:
        return by_lower["train"], by_lower["test"]
    return None


def image_folder(
    root: str | Path,
    classes_per_task: int | Sequence[int],
    class_order: Sequence[int | str] | None = None,
    seed: int | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    image_size: int = 224,
    train_transform: Any = None,
    test_transform: Any = None,
) -> ContinualBenchmark:
    """Images in one folder per class; classes are the sorted folder names.

    With ``root/train`` and ``root/test`` those splits are used; otherwise each class's files
    (sorted, shuffled with ``split_seed``) are split, ``test_fraction`` of them (at least one) to test.
    ``seed`` shuffles the class order when ``class_order`` is not given.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image_folder: root={str(root)!r} is not a directory")
    if train_transform is None or test_transform is None:
        default_train, default_test = default_transforms(image_size)
        train_transform = default_train if train_transform is None else train_transform
        test_transform = default_test if test_transform is None else test_transform

    splits = _split_subfolders(root)
    if splits is not None:
        classes = [d.name for d in _class_dirs(splits[0])]
        train = folder_dataset(splits[0], train_transform, classes)
        test = folder_dataset(splits[1], test_transform, classes)
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        classes = [d.name for d in _class_dirs(root)]
        tr_paths, tr_labels, te_paths, te_labels = [], [], [], []
        for label, name in enumerate(classes):
            files = _image_files(root / name)
            if len(files) < 2:
                raise ValueError(f"image_folder: class {name!r} has {len(files)} images; need at least 2")
            random.Random(f"{split_seed}:{name}").shuffle(files)
            n_test = min(len(files) - 1, max(1, round(len(files) * test_fraction)))
            te_paths += files[:n_test]
            te_labels += [label] * n_test
            tr_paths += files[n_test:]
            tr_labels += [label] * (len(files) - n_test)
        train = ImageFileDataset(tr_paths, tr_labels, train_transform, classes)
        test = ImageFileDataset(te_paths, te_labels, test_transform, classes)
    if not classes:
        raise ValueError(f"image_folder: no class folders under {root}")
    order = resolve_class_order(classes, class_order, seed)
    return build_benchmark(
        f"image_folder:{root.name}",
        classes,
        train,
        test,
        order,
        classes_per_task,
        "image",
        train_labels=train.targets,
        test_labels=test.targets,
    )


def tensor_file(
    path: str | Path,
    classes_per_task: int | Sequence[int],
    class_order: Sequence[int | str] | None = None,
    seed: int | None = None,
) -> ContinualBenchmark:
    """A benchmark from a ``.pt`` tensor file or a JSON / JSON-lines text file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tensor_file: path={str(path)!r} is not a file")
    if path.name.endswith(TEXT_SUFFIXES):
        return text_benchmark(
            f"tensor_file:{path.name}", load_text_json(path), classes_per_task, class_order, seed
        )
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"tensor_file: unsupported file type {path.name!r}; use .pt/.pth or {TEXT_SUFFIXES}")

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file becomes one clear error
        lines = str(error).splitlines()
        raise ValueError(
            f"tensor_file: cannot read {str(path)!r} as a torch file ({type(error).__name__}: "
            f"{lines[0][:200] if lines else ''})"
        ) from error
    if not isinstance(obj, dict):
        raise ValueError(f"tensor_file: {path.name} must hold a dict with 'train' and 'test'")
    parts = {}
    for split in ("train", "test"):
        part = obj.get(split)
        if (
            not isinstance(part, dict)
            or not isinstance(part.get("x"), torch.Tensor)
            or not isinstance(part.get("y"), torch.Tensor)
        ):
            raise ValueError(f"tensor_file: {path.name} needs {split!r}: {{'x': Tensor, 'y': Tensor}}")
        x, y = part["x"], part["y"]
        bad_y = y.is_floating_point() or y.is_complex() or y.dtype == torch.bool
        if x.dim() == 0 or y.dim() != 1 or len(x) != len(y) or bad_y:
            raise ValueError(
                f"tensor_file: {split} y must be a 1-D integer (not bool) tensor with one label per row of x "
                f"(x {tuple(x.shape)}, y {tuple(y.shape)} {y.dtype})"
            )
        if not (x.is_floating_point() or x.dtype == torch.uint8):
            raise ValueError(
                f"tensor_file: {split} x must be floating point (used as stored) or uint8 (scaled to [0, 1]), "
                f"got {x.dtype}"
            )
        if len(y) and int(y.min()) < 0:
            raise ValueError(f"tensor_file: {split} labels must be non-negative")
        parts[split] = TensorPairDataset(x, y, f"{path.name} {split}")
    num = max(max(p.targets, default=-1) for p in parts.values()) + 1
    names = obj.get("classes")
    if names is not None and (not isinstance(names, list | tuple) or not all(isinstance(c, str) for c in names)):
        raise ValueError(f"tensor_file: 'classes' must be a list of class-name strings, got {names!r}"[:300])
    classes = list(names) if names is not None else [str(i) for i in range(num)]
    if num > len(classes):
        raise ValueError(f"tensor_file: label {num - 1} but only {len(classes)} class names")
    order = resolve_class_order(classes, class_order, seed)
    modality = "image" if parts["train"].x.dim() == 4 else "tensor"
    return build_benchmark(
        f"tensor_file:{path.name}",
        classes,
        parts["train"],
        parts["test"],
        order,
        classes_per_task,
        modality,
        train_labels=parts["train"].targets,
        test_labels=parts["test"].targets,
    )
