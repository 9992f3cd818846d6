"""Bad or unusual user data: each case is converted as documented or refused with a message naming the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL", reason="needs Pillow (image folders)")
from PIL import Image  # noqa: E402

from l2p_fast.continual.benchmarks import image_folder, tensor_file, wordnet20  # noqa: E402


def save_split_file(path, x_train, y_train, x_test=None, y_test=None, **extra):
    x_test = x_train if x_test is None else x_test
    y_test = y_train if y_test is None else y_test
    torch.save({"train": {"x": x_train, "y": y_train}, "test": {"x": x_test, "y": y_test}, **extra}, path)
    return path


def test_uint8_images_are_scaled_to_unit_range(tmp_path):
    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2) * 4
    path = save_split_file(tmp_path / "u8.pt", x, torch.tensor([0, 0, 1, 1]))
    item, _ = tensor_file(path, classes_per_task=1).train[0][0]
    assert item.dtype == torch.float32 and torch.equal(item, x[0].float() / 255)
    assert float(item.max()) <= 1.0


@pytest.mark.parametrize(
    "change,match",
    [
        ({"y": torch.tensor([True, False, True, False])}, "integer \\(not bool\\)"),
        ({"x": torch.zeros(4, 3, 2, 2, dtype=torch.int32)}, "floating point .* or uint8 .*got torch.int32"),
        ({"classes": "ab"}, "'classes' must be a list of class-name strings, got 'ab'"),
        ({"classes": ["a", "a"]}, "class names must be distinct, \\['a'\\] appear more than once"),
    ],
)
def test_bad_tensor_files(change, match, tmp_path):
    x, y = change.pop("x", torch.zeros(4, 3, 2, 2)), change.pop("y", torch.tensor([0, 1, 0, 1]))
    path = save_split_file(tmp_path / "bad.pt", x, y, **change)
    with pytest.raises(ValueError, match=match):
        tensor_file(path, classes_per_task=1)


def test_garbled_and_empty_tensor_files(tmp_path):
    (tmp_path / "garbled.pt").write_bytes(b"\x00\x01 not a torch file")
    with pytest.raises(ValueError, match="cannot read .*garbled.pt.* as a torch file"):
        tensor_file(tmp_path / "garbled.pt", classes_per_task=1)
    path = save_split_file(tmp_path / "empty_test.pt", torch.zeros(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]),
                           torch.zeros(0, 3, 2, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no test examples for classes"):
        tensor_file(path, classes_per_task=1)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("list.json", json.dumps([["a", 0], ["b", 1]]), "must hold a JSON object .* got a list"),
        ("garbled.json", "{not json", "cannot read .* as JSON"),
        ("no_label.jsonl", json.dumps({"text": "a", "split": "train"}) + "\n", ":1: expected an object with 'text', 'label'"),
        ("bad_line.jsonl", "{\n", ":1: not a JSON line"),
        ("string_classes.json", json.dumps({"classes": "ab", "train": [["a", 0]], "test": [["b", 1]]}),
         "classes must be a list of class-name strings"),
        ("dup_classes.json", json.dumps({"classes": ["x", "x"], "train": [["a", 0]], "test": [["b", 1]]}),
         "class names must be distinct"),
        ("bool_label.json", json.dumps({"train": [["a", True]], "test": [["b", False]]}), "bad example"),
        ("empty_train.json", json.dumps({"classes": ["x"], "train": [], "test": [["b", 0]]}), "no train examples"),
    ],
)
def test_bad_text_files(name, content, match, tmp_path):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        tensor_file(tmp_path / name, classes_per_task=1)


def test_wordnet20_data_pointing_nowhere(tmp_path):
    with pytest.raises(ValueError, match="data: wordnet20 reads a JSON text file from --data, but .* is not a file"):
        wordnet20(path=tmp_path / "nowhere.json")


def write_image(path, mode="RGB", size=(12, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = np.random.default_rng(0).integers(0, 256, size=(*size[::-1], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)


def test_grey_rgba_and_odd_sized_images_are_converted_and_resized(tmp_path):
    write_image(tmp_path / "train" / "a" / "grey.png", "L", (7, 30))
    write_image(tmp_path / "train" / "b" / "rgba.png", "RGBA", (40, 9))
    write_image(tmp_path / "test" / "a" / "big.png", "RGB", (300, 200))
    write_image(tmp_path / "test" / "b" / "tiny.png", "L", (1, 1))
    bench = image_folder(tmp_path, classes_per_task=1, image_size=8)
    for split in (*bench.train, *bench.test):
        x, _ = split[0]
        assert tuple(x.shape) == (3, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage bytes, not an image", b"text file", "truncated"],
)
def test_unreadable_image_files_are_named(content, tmp_path):
    for name in ("a", "b"):
        write_image(tmp_path / "train" / name / "ok.png")
        write_image(tmp_path / "test" / name / "ok.png")
    bad = tmp_path / "train" / "a" / "zz_bad.png"
    if content == "truncated":
        write_image(bad, "RGB", (64, 64))
        content = bad.read_bytes()[:200]
    bad.write_bytes(content)
    bench = image_folder(tmp_path, classes_per_task=1, image_size=8)
    files = bench.train[0].source.paths
    index = next(i for i, k in enumerate(bench.train[0].indices) if files[k] == bad)
    with pytest.raises(ValueError, match=r"image_folder: cannot read image '.*zz_bad.png' .*remove or replace"):
        bench.train[0][index]
    assert bench.train[0].describe(index) == str(bad)
