"""The L2P image transforms: every input kind becomes (3, H, W) uint8 RGB, then the tensor augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from l2p_fast.continual.benchmarks.transforms import default_transforms, to_rgb_tensor

RGB = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)


@pytest.mark.parametrize(
    "image",
    [Image.fromarray(RGB), torch.from_numpy(RGB).permute(2, 0, 1).contiguous(), RGB],
    ids=["pil", "tensor-chw", "array-hwc"],
)
def test_rgb_inputs_keep_their_pixels(image):
    out = to_rgb_tensor(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 5)
    assert torch.equal(out, torch.from_numpy(RGB).permute(2, 0, 1))


def test_grey_alpha_and_palette_become_rgb():
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    expected = torch.from_numpy(grey).expand(3, 4, 5)
    for image in (Image.fromarray(grey), torch.from_numpy(grey), torch.from_numpy(grey)[None], grey):
        assert torch.equal(to_rgb_tensor(image), expected)
    rgba = torch.cat([torch.from_numpy(RGB).permute(2, 0, 1), torch.full((1, 4, 5), 7, dtype=torch.uint8)])
    assert torch.equal(to_rgb_tensor(rgba), rgba[:3])
    assert torch.equal(to_rgb_tensor(Image.fromarray(RGB).convert("RGBA")), rgba[:3])
    palette = Image.fromarray(RGB).convert("P")
    assert torch.equal(to_rgb_tensor(palette), to_rgb_tensor(palette.convert("RGB")))


@pytest.mark.parametrize(
    "image,error,match",
    [
        (torch.zeros(3, 4, 4), ValueError, "image: expected dtype uint8, got torch.float32"),
        (torch.zeros(2, 4, 4, dtype=torch.uint8), ValueError, r"image: expected shape .* got \(2, 4, 4\)"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), ValueError, r"got \(1, 3, 4, 4\)"),
        ([[0]], TypeError, "image: expected a PIL image, a uint8 tensor or a uint8 array, got list"),
    ],
)
def test_bad_images_are_named(image, error, match):
    with pytest.raises(error, match=match):
        to_rgb_tensor(image)


def test_train_transform_is_seeded_and_in_range():
    train, test = default_transforms(16)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    torch.manual_seed(5)
    a = train(image)
    torch.manual_seed(5)
    b = train(image)
    torch.manual_seed(6)
    c = train(image)
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert test(image).shape == (3, 16, 16) and torch.equal(test(image), test(image))


def test_test_transform_of_a_constant_image_is_constant():
    _, test = default_transforms(48)
    out = test(torch.full((3, 60, 80), 51, dtype=torch.uint8))
    assert out.shape == (3, 48, 48) and torch.allclose(out, torch.full_like(out, 51 / 255), atol=1e-6)


@pytest.mark.parametrize("size", [0, 2.5, True, -3])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match="image_size: expected a positive integer"):
        default_transforms(size)
