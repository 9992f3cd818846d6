"""Text benchmarks: the embedded ``wordnet20`` set and the JSON text format it shares with users.

JSON text format (``.json``, ``.json.gz``)::

    {"classes": [...],            # optional: class names, index = label id
     "class_order": [...],        # optional: default learning order (ids or names)
     "train": [[text, label], ...] or [{"text": ..., "label": ...}, ...],
     "test":  [...]}

JSON-lines format (``.jsonl``): one ``{"text": ..., "label": ..., "split": "train"|"test"}`` per line.
Labels are integer ids or class-name strings (not bools); ``classes`` is a list of distinct names.
Anything else (a top-level list, a line without ``label``, unreadable JSON) is a ``ValueError``
naming the file (and line).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .base import ContinualBenchmark, build_benchmark, check_class_names, resolve_class_order

WORDNET20_RESOURCE = "wordnet20.json.gz"


class TextDataset(Dataset):
    """A list of ``(text, label)`` pairs."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int]) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"texts ({len(texts)}) and labels ({len(labels)}) differ in length")
        self.texts = list(texts)
        self.targets = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], self.targets[i]


def load_text_json(path: str | Path) -> dict[str, Any]:
    """Read a ``.json``, ``.json.gz`` or ``.jsonl`` text file into the JSON text format dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text data: {str(path)!r} is not a file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                return _read_jsonl(f, path)
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError) as error:
        raise ValueError(f"text data: cannot read {str(path)!r} as JSON ({type(error).__name__}: {error})") from error
    if not isinstance(obj, dict):
        raise ValueError(
            f"text data: {str(path)!r} must hold a JSON object with 'train' and 'test' lists, got a "
            f"{type(obj).__name__}"
        )
    return obj


def _read_jsonl(lines: Any, path: Path) -> dict[str, Any]:
    obj: dict[str, Any] = {"train": [], "test": []}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{n}: not a JSON line ({error})") from error
        if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
            raise ValueError(
                f"{path}:{n}: expected an object with 'text', 'label' and 'split', got {line.strip()[:200]}"
            )
        split = rec.get("split")
        if split not in ("train", "test"):
            raise ValueError(f"{path}:{n}: 'split' must be 'train' or 'test', got {split!r}")
        obj[split].append([rec["text"], rec["label"]])
    return obj


def text_splits(obj: dict[str, Any], source: str = "text data") -> tuple[list[str], TextDataset, TextDataset]:
    """Class names and train/test :class:`TextDataset` from a JSON text format dict."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict with 'train' and 'test' lists, got a {type(obj).__name__}")
    for split in ("train", "test"):
        if not isinstance(obj.get(split), list):
            raise ValueError(f"{source}: needs a list under {split!r}")
    pairs = {split: [_pair(item, source) for item in obj[split]] for split in ("train", "test")}
    raw_labels = [y for split in pairs.values() for _, y in split]
    classes = obj.get("classes")
    if not raw_labels:
        raise ValueError(f"{source}: no examples")
    if classes is None:
        if all(isinstance(y, str) for y in raw_labels):
            classes = sorted(set(raw_labels))
        elif all(isinstance(y, int) for y in raw_labels):
            classes = [str(i) for i in range(max(raw_labels) + 1)]
        else:
            raise ValueError(f"{source}: labels mix ids and names; give 'classes' or use one kind")
    check_class_names(source, classes)
    index = {name: i for i, name in enumerate(classes)}

    def label_id(y: Any) -> int:
        if isinstance(y, str):
            if y not in index:
                raise ValueError(f"{source}: label {y!r} is not one of the classes {classes}")
            return index[y]
        if int(y) != y or not 0 <= y < len(classes):
            raise ValueError(f"{source}: label {y!r} is not a class id in [0, {len(classes) - 1}]")
        return int(y)

    datasets = [
        TextDataset([t for t, _ in pairs[s]], [label_id(y) for _, y in pairs[s]]) for s in ("train", "test")
    ]
    return list(classes), datasets[0], datasets[1]


def text_benchmark(
    name: str,
    obj: dict[str, Any],
    classes_per_task: int | Sequence[int],
    class_order: Sequence[int | str] | None = None,
    seed: int | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> ContinualBenchmark:
    """A :class:`ContinualBenchmark` from a JSON text format dict (see module docstring)."""
    classes, train, test = text_splits(obj, name)
    if class_order is None and seed is None and obj.get("class_order") is not None:
        class_order = obj["class_order"]
    order = resolve_class_order(classes, class_order, seed)
    train = _limit_per_class(train, train_per_class, "train_per_class")
    test = _limit_per_class(test, test_per_class, "test_per_class")
    return build_benchmark(
        name,
        classes,
        train,
        test,
        order,
        classes_per_task,
        "text",
        train_labels=train.targets,
        test_labels=test.targets,
    )


def wordnet20(
    classes_per_task: int | Sequence[int] = 4,
    class_order: Sequence[int | str] | None = None,
    seed: int | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    path: str | Path | None = None,
) -> ContinualBenchmark:
    """The embedded offline benchmark: WordNet 3.0 noun definitions, 20 lexicographer classes.

    300 train / 100 test definitions per class, 5 tasks of 4 classes in a fixed seeded order
    (built by ``scripts/build_wordnet20.py``; licence in ``data/WORDNET_LICENSE.txt``).
    ``train_per_class`` / ``test_per_class`` keep only the first n examples per class (quick runs).
    """
    if path is not None and not Path(path).is_file():
        raise ValueError(f"data: wordnet20 reads a JSON text file from --data, but {str(path)!r} is not a file")
    if path is None:
        resource = resources.files("l2p_fast.continual").joinpath("data", WORDNET20_RESOURCE)
        with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            obj = json.load(f)
    else:
        obj = load_text_json(path)
    return text_benchmark(
        "wordnet20", obj, classes_per_task, class_order, seed, train_per_class, test_per_class
    )


def _pair(item: Any, source: str) -> tuple[str, Any]:
    if isinstance(item, dict):
        text, label = item.get("text"), item.get("label")
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        text, label = item
    else:
        raise ValueError(f"{source}: each example must be [text, label] or {{'text', 'label'}}, got {item!r}")
    if not isinstance(text, str) or isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ValueError(f"{source}: bad example {item!r} (need a str text and an int or str label)")
    return text, label


def _limit_per_class(data: TextDataset, limit: int | None, arg: str) -> TextDataset:
    if limit is None:
        return data
    if int(limit) != limit or limit < 1:
        raise ValueError(f"{arg} must be a positive integer or None, got {limit!r}")
    kept: dict[int, int] = {}
    texts, labels = [], []
    for text, y in zip(data.texts, data.targets, strict=True):
        if kept.get(y, 0) < limit:
            kept[y] = kept.get(y, 0) + 1
            texts.append(text)
            labels.append(y)
    return TextDataset(texts, labels)
