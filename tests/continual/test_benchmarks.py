"""Benchmark loaders: task split, label remapping, determinism, and the embedded wordnet20 set.

CIFAR-100, 5-datasets, image folders and tensor files run through the real loader code on tiny
synthetic stand-ins written to ``tmp_path`` (no network).
"""

import gzip
import importlib.util
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from l2p_fast.continual.benchmarks import (
    available_benchmarks,
    five_datasets,
    get_benchmark,
    image_folder,
    split_cifar100,
    split_tasks,
    tensor_file,
    wordnet20,
)

REPO = Path(__file__).resolve().parents[2]
WORDNET_DIR = Path("/usr/share/wordnet")


def raw_wordnet20() -> dict:
    data = resources.files("l2p_fast.continual").joinpath("data", "wordnet20.json.gz").read_bytes()
    return json.loads(gzip.decompress(data))


def check_remapping(bench, original_label_of) -> None:
    """Task t holds exactly its classes, labels are class-order positions, contiguous per task."""
    for t in range(bench.num_tasks):
        expected = bench.task_labels(t)
        for split in (bench.train[t], bench.test[t]):
            assert sorted(set(split.targets)) == expected
            for k in range(len(split)):
                _, label = split[k]
                assert label == split.targets[k]
                assert bench.class_order[label] == original_label_of(split, k)
                assert bench.class_order[label] in bench.tasks[t]


# --- wordnet20 -------------------------------------------------------------------------------


def test_wordnet20_shape_and_split():
    bench = wordnet20()
    assert bench.modality == "text"
    assert bench.num_tasks == 5 and bench.num_classes == 20
    assert [len(c) for c in bench.tasks] == [4] * 5
    assert bench.task_labels(2) == [8, 9, 10, 11]
    assert bench.num_seen_classes(2) == 12
    for t in range(5):
        assert len(bench.train[t]) == 4 * 300 and len(bench.test[t]) == 4 * 100
        text, label = bench.train[t][0]
        assert isinstance(text, str) and text and isinstance(label, int)
    assert len(bench.test_up_to(2)) == 3 * 400
    assert all(name.startswith("noun.") and name != "noun.Tops" for name in bench.class_names)


def test_wordnet20_labels_are_class_order_positions():
    raw = raw_wordnet20()
    original = {text: y for text, y in raw["train"] + raw["test"]}
    bench = wordnet20()
    assert bench.class_order == raw["class_order"]
    check_remapping(bench, lambda split, k: original[split[k][0]])


def test_wordnet20_dedup_and_no_overlap():
    raw = raw_wordnet20()
    assert len(raw["classes"]) == 20 and sorted(raw["class_order"]) == list(range(20))
    train_texts = [t.lower() for t, _ in raw["train"]]
    test_texts = [t.lower() for t, _ in raw["test"]]
    assert len(set(train_texts)) == len(train_texts)
    assert len(set(test_texts)) == len(test_texts)
    assert not set(train_texts) & set(test_texts)
    labels_of: dict[str, set[int]] = {}
    for text, y in raw["train"] + raw["test"]:
        labels_of.setdefault(text.lower(), set()).add(y)
    assert all(len(labels) == 1 for labels in labels_of.values())
    counts = np.bincount([y for _, y in raw["train"]], minlength=20)
    assert counts.tolist() == [300] * 20
    assert np.bincount([y for _, y in raw["test"]], minlength=20).tolist() == [100] * 20


def test_wordnet20_packaged_file_is_deterministic_gzip():
    data = resources.files("l2p_fast.continual").joinpath("data", "wordnet20.json.gz").read_bytes()
    assert data[:2] == b"\x1f\x8b" and data[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    assert len(data) < 3_000_000
    licence = resources.files("l2p_fast.continual").joinpath("data", "WORDNET_LICENSE.txt").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(), reason="needs Debian package wordnet-base")
def test_build_script_reproduces_packaged_file():
    spec = importlib.util.spec_from_file_location("build_wordnet20", REPO / "scripts" / "build_wordnet20.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.gzip_json(module.build(WORDNET_DIR))
    packaged = resources.files("l2p_fast.continual").joinpath("data", "wordnet20.json.gz").read_bytes()
    assert built == packaged


def test_wordnet20_options_and_determinism():
    a, b = wordnet20(), wordnet20()
    assert [a.train[1][i] for i in range(0, 1200, 97)] == [b.train[1][i] for i in range(0, 1200, 97)]
    shuffled = wordnet20(seed=1)
    assert shuffled.class_order != a.class_order and sorted(shuffled.class_order) == list(range(20))
    assert wordnet20(seed=1).class_order == shuffled.class_order
    small = wordnet20(classes_per_task=10, train_per_class=5, test_per_class=2)
    assert small.num_tasks == 2 and len(small.train[0]) == 50 and len(small.test[1]) == 20
    named = wordnet20(class_order=["noun.food", "noun.animal"], classes_per_task=1)
    assert named.ordered_class_names == ["noun.food", "noun.animal"]
    assert set(named.train[1].targets) == {1}
    with pytest.raises(ValueError, match="classes_per_task"):
        wordnet20(classes_per_task=3)
    with pytest.raises(ValueError, match="unknown class"):
        wordnet20(class_order=["noun.nothing"], classes_per_task=1)
    with pytest.raises(ValueError, match="repeats"):
        wordnet20(class_order=[0, 0], classes_per_task=1)


def test_text_batches_collate():
    bench = wordnet20(train_per_class=4)
    texts, labels = next(iter(DataLoader(bench.train[0], batch_size=8)))
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
    assert labels.dtype == torch.int64 and labels.shape == (8,)


# --- registry and task splitting ---------------------------------------------------------------


def test_registry():
    assert set(available_benchmarks()) >= {
        "wordnet20",
        "split_cifar100",
        "five_datasets",
        "image_folder",
        "tensor_file",
    }
    assert get_benchmark("wordnet20", classes_per_task=5).num_tasks == 4
    with pytest.raises(ValueError, match=r"name='nope'.*wordnet20"):
        get_benchmark("nope")


def test_split_tasks():
    assert split_tasks([5, 3, 1, 0], 2) == [[5, 3], [1, 0]]
    assert split_tasks([5, 3, 1, 0], [1, 3]) == [[5], [3, 1, 0]]
    for bad in (3, 0, [2, 1], [4, 0]):
        with pytest.raises(ValueError, match="classes_per_task"):
            split_tasks([5, 3, 1, 0], bad)


# --- synthetic image stand-ins -----------------------------------------------------------------


class FakeTorchvision:
    """Same interface as a torchvision data set: (root, train, download, transform), .classes, .targets."""

    def __init__(self, num_classes, per_class, size=32, mode="RGB", seed=0, labels_attr="targets"):
        self.num_classes, self.per_class, self.size, self.mode = num_classes, per_class, size, mode
        self.seed, self.labels_attr = seed, labels_attr

    def __call__(self, root, train, download, transform):
        rng = np.random.default_rng(self.seed + int(train))
        n = self.num_classes * (self.per_class if train else 1)
        channels = 3 if self.mode == "RGB" else 1
        ds = _FakeData(
            rng.integers(0, 256, size=(n, self.size, self.size, channels), dtype=np.uint8),
            [i % self.num_classes for i in range(n)],
            self.mode,
            transform,
        )
        setattr(ds, self.labels_attr, ds.labels_list)
        if self.labels_attr == "targets":
            ds.classes = [f"k{i}" for i in range(self.num_classes)]
        return ds


class _FakeData:
    def __init__(self, data, labels, mode, transform):
        self.data, self.labels_list, self.mode, self.transform = data, labels, mode, transform

    def __len__(self):
        return len(self.labels_list)

    def __getitem__(self, i):
        array = self.data[i] if self.mode == "RGB" else self.data[i, :, :, 0]
        image = Image.fromarray(array, mode=self.mode)
        return self.transform(image), self.labels_list[i]


def by_source_label(split, k):
    return (
        split.source[split.indices[k]][1]
        if not hasattr(split.source, "labels_list")
        else split.source.labels_list[split.indices[k]]
    )


def test_split_cifar100_stand_in():
    fake = {"cifar100": FakeTorchvision(100, 2)}
    bench = split_cifar100(image_size=16, factories=fake, seed=3)
    assert bench.num_tasks == 10 and [len(t) for t in bench.tasks] == [10] * 10
    assert len(bench.train[0]) == 20 and len(bench.test[9]) == 10
    assert bench.class_names[0] == "k0" and sorted(bench.class_order) == list(range(100))
    assert split_cifar100(image_size=16, factories=fake, seed=3).class_order == bench.class_order
    check_remapping(bench, by_source_label)
    x, y = bench.train[4][0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y in bench.task_labels(4)
    # natural order by default, as in the L2P port
    natural = split_cifar100(image_size=16, factories=fake, num_tasks=5)
    assert natural.class_order == list(range(100)) and natural.task_labels(1) == list(range(20, 40))
    with pytest.raises(ValueError, match="num_tasks"):
        split_cifar100(image_size=16, factories=fake, num_tasks=7)


def test_default_transforms_resize_large_images():
    bench = split_cifar100(image_size=48, factories={"cifar100": FakeTorchvision(100, 1)}, num_tasks=1)
    assert bench.train[0][0][0].shape == (3, 48, 48)
    assert bench.test[0][0][0].shape == (3, 48, 48)


def write_pngs(folder: Path, count: int, size: int = 12, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_five_datasets_stand_in(tmp_path):
    for split in ("Train", "Test"):
        for letter in "ABC":
            write_pngs(tmp_path / "notMNIST" / split / letter, 2 if split == "Train" else 1)
    fakes = {
        "svhn": FakeTorchvision(10, 2, labels_attr="labels"),  # torchvision SVHN: .labels, no .classes
        "mnist": FakeTorchvision(10, 2, size=28, mode="L"),
        "cifar10": FakeTorchvision(10, 2),
        "fashion_mnist": FakeTorchvision(4, 2, size=28, mode="L"),
    }
    bench = five_datasets(root=tmp_path, image_size=16, factories=fakes)
    assert [len(t) for t in bench.tasks] == [10, 10, 10, 3, 4]
    assert bench.class_order == list(range(37))
    assert bench.class_names[0] == "svhn/0" and bench.class_names[30] == "notmnist/A"
    assert bench.task_labels(3) == [30, 31, 32]
    for t in range(bench.num_tasks):
        x, y = bench.test[t][0]
        assert x.shape == (3, 16, 16) and y in bench.task_labels(t)  # grey-scale became RGB
        assert sorted(set(bench.train[t].targets)) == bench.task_labels(t)
    assert len(bench.train[3]) == 6 and len(bench.test[3]) == 3
    reordered = five_datasets(root=tmp_path, image_size=16, factories=fakes, seed=0)
    assert sorted(reordered.class_names) == sorted(bench.class_names)
    assert (
        reordered.class_names
        == five_datasets(root=tmp_path, image_size=16, factories=fakes, seed=0).class_names
    )
    with pytest.raises(FileNotFoundError, match="notMNIST"):
        five_datasets(root=tmp_path / "empty", image_size=16, datasets=["notmnist"])
    with pytest.raises(ValueError, match="unknown data set"):
        five_datasets(image_size=16, datasets=["imagenet"])


def test_image_folder_fraction_split(tmp_path):
    for c, name in enumerate(["cat", "dog", "eel", "fox"]):
        write_pngs(tmp_path / "zoo" / name, 5, seed=c)
    bench = image_folder(
        tmp_path / "zoo", classes_per_task=2, image_size=8, class_order=["fox", "cat", "eel", "dog"]
    )
    assert bench.ordered_class_names == ["fox", "cat", "eel", "dog"]
    assert [len(s) for s in bench.train] == [8, 8] and [len(s) for s in bench.test] == [2, 2]
    x, y = bench.train[0][0]
    assert x.shape == (3, 8, 8) and y in (0, 1)
    for t in range(2):
        train_files = {bench.train[t].source.paths[i] for i in bench.train[t].indices}
        test_files = {bench.test[t].source.paths[i] for i in bench.test[t].indices}
        assert not train_files & test_files
        for split in (bench.train[t], bench.test[t]):
            for k, i in enumerate(split.indices):
                assert split.source.paths[i].parent.name == bench.ordered_class_names[split.targets[k]]
    again = image_folder(
        tmp_path / "zoo", classes_per_task=2, image_size=8, class_order=["fox", "cat", "eel", "dog"]
    )
    assert again.test[0].source.paths == bench.test[0].source.paths
    other = image_folder(tmp_path / "zoo", classes_per_task=2, image_size=8, split_seed=5)
    assert other.class_order == [0, 1, 2, 3]


def test_image_folder_train_test_subfolders(tmp_path):
    for name in ("a", "b"):
        write_pngs(tmp_path / "train" / name, 3)
        write_pngs(tmp_path / "test" / name, 1)
    bench = image_folder(tmp_path, classes_per_task=1, image_size=8)
    assert bench.class_names == ["a", "b"]
    assert [len(s) for s in bench.train] == [3, 3] and [len(s) for s in bench.test] == [1, 1]
    write_pngs(tmp_path / "test" / "zzz", 1)
    with pytest.raises(ValueError, match="zzz"):
        image_folder(tmp_path, classes_per_task=1, image_size=8)


def test_tensor_file_pt(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(40, 3, 8, 8, generator=gen), torch.randn(12, 3, 8, 8, generator=gen)
    y_train, y_test = torch.arange(40) % 4, torch.arange(12) % 4
    path = tmp_path / "toy.pt"
    torch.save({"train": {"x": x_train, "y": y_train}, "test": {"x": x_test, "y": y_test}}, path)
    bench = tensor_file(path, classes_per_task=2, class_order=[3, 1, 0, 2])
    assert bench.modality == "image" and bench.class_names == ["0", "1", "2", "3"]
    assert [len(s) for s in bench.train] == [20, 20]
    check_remapping(
        bench,
        lambda split, k: int(y_train[split.indices[k]] if split in bench.train else y_test[split.indices[k]]),
    )
    first = bench.train[0].indices[0]
    x, y = bench.train[0][0]
    assert first == 1 and torch.equal(x, x_train[first]) and y == 1  # class 1 is at position 1
    assert bench.train[0].targets.count(0) == 10  # class 3 is at position 0

    torch.save({"train": {"x": x_train, "y": y_train.float()}, "test": {"x": x_test, "y": y_test}}, path)
    with pytest.raises(ValueError, match="integer"):
        tensor_file(path, classes_per_task=2)
    with pytest.raises(ValueError, match="not a file"):
        tensor_file(tmp_path / "missing.pt", classes_per_task=2)


def test_tensor_file_text_formats(tmp_path):
    jsonl = tmp_path / "texts.jsonl"
    rows = [
        {"text": f"{kind} {i}", "label": kind, "split": "train" if i < 3 else "test"}
        for kind in ("red", "green", "blue")
        for i in range(4)
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bench = tensor_file(jsonl, classes_per_task=1, class_order=["red", "green", "blue"])
    assert bench.modality == "text" and bench.class_names == ["blue", "green", "red"]
    assert bench.train[0][0] == ("red 0", 0) and bench.test[2][0] == ("blue 3", 2)

    as_json = tmp_path / "texts.json"
    as_json.write_text(
        json.dumps(
            {
                "classes": ["x", "y"],
                "class_order": [1, 0],
                "train": [["a", 0], ["b", 1]],
                "test": [{"text": "c", "label": 1}, {"text": "d", "label": 0}],
            }
        )
    )
    bench = tensor_file(as_json, classes_per_task=1)
    assert bench.class_order == [1, 0] and bench.train[0][0] == ("b", 0) and bench.test[1][0] == ("d", 1)

    as_json.write_text(json.dumps({"train": [["a", 0], ["b", "y"]], "test": [["c", 0]]}))
    with pytest.raises(ValueError, match="mix"):
        tensor_file(as_json, classes_per_task=1)
    with pytest.raises(ValueError, match="unsupported"):
        tensor_file(Path(__file__), classes_per_task=1)
