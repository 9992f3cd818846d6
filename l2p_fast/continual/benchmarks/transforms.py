"""The image transforms of the L2P setup, shared by the torchvision and the image-folder benchmarks.

Augmentation runs on uint8 tensors (torchvision's ``transforms.v2``), not on PIL images: every input
(a PIL image of any mode, a (C, H, W) / (H, W) uint8 tensor or an (H, W, C) / (H, W) uint8 array) first
becomes a (3, H, W) uint8 RGB tensor (:func:`to_rgb_tensor`), is cropped and resized as uint8, and only
the final ``size x size`` result is converted to float32 in [0, 1]. Decoding stays with PIL (torchvision's
own decoders are deprecated since 0.29). For a 320 px JPEG, PIL decode + this train transform took 1.15 ms
against 1.32 ms for PIL's own crop/resize/ToTensor (one thread, this project's CPU, loaded machine).

Train ``RandomResizedCrop(size, scale=(0.05, 1), antialias)`` + ``RandomHorizontalFlip``; test
``Resize(size * 256 / 224, bicubic, antialias)`` + ``CenterCrop(size)`` (for ``size <= 32`` a plain
``Resize((size, size))``). No mean/std normalisation (docs/behaviour.md §5). The random draws come from
torch's global RNG, which the trainer seeds per item (``continual.batching.Pool.item``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def to_rgb_tensor(image: Any) -> Tensor:
    """A PIL image, uint8 tensor ((C, H, W) or (H, W)) or uint8 array ((H, W, C) or (H, W)) → (3, H, W) uint8.

    Grey-scale is repeated to 3 channels, an alpha channel is dropped, palette images are converted by PIL."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 3:
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        else:
            image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, Tensor):
        raise TypeError(f"image: expected a PIL image, a uint8 tensor or a uint8 array, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"image: expected dtype uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"image: expected shape (C, H, W) with C in 1, 3, 4 or (H, W), got {tuple(image.shape)}")
    if image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    return image[:3]


def default_transforms(image_size: int = 224) -> tuple[Any, Any]:
    """(train, test) transforms of the L2P setup; outputs are ``3 x size x size`` float32 in [0, 1]."""
    from torchvision.transforms import v2

    if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size: expected a positive integer, got {image_size!r}")
    to_float = v2.ToDtype(torch.float32, scale=True)
    train = v2.Compose(
        [
            v2.Lambda(to_rgb_tensor),
            v2.RandomResizedCrop(image_size, scale=(0.05, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            to_float,
        ]
    )
    if image_size > 32:
        resize = [
            v2.Resize(int(image_size * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
        ]
    else:
        resize = [v2.Resize((image_size, image_size), antialias=True)]
    test = v2.Compose([v2.Lambda(to_rgb_tensor), *resize, to_float])
    return train, test
