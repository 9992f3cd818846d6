"""The image transforms of the L2P setup, shared by the torchvision and the image-folder benchmarks.

Train ``RandomResizedCrop(size, scale=(0.05, 1))`` + ``RandomHorizontalFlip`` + ``ToTensor``; test
``Resize(size * 256 / 224, bicubic)`` + ``CenterCrop(size)`` + ``ToTensor`` (for ``size <= 32`` a plain
``Resize((size, size))``). Every image is converted to RGB first (grey-scale, palette and RGBA images
become 3-channel) and resized, so any size and mode gives ``3 x size x size`` in [0, 1]; no mean/std
normalisation (docs/behaviour.md §5).
"""

from __future__ import annotations

from typing import Any


def to_rgb(image: Any) -> Any:
    """Convert a PIL image to RGB (a no-op for RGB images and non-PIL inputs)."""
    convert = getattr(image, "convert", None)
    if convert is not None and getattr(image, "mode", "RGB") != "RGB":
        return convert("RGB")
    return image


def default_transforms(image_size: int = 224) -> tuple[Any, Any]:
    """(train, test) torchvision transforms of the L2P setup; outputs are ``3 x size x size`` in [0, 1]."""
    from torchvision import transforms as T

    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    train = T.Compose(
        [
            T.Lambda(to_rgb),
            T.RandomResizedCrop(image_size, scale=(0.05, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
            T.RandomHorizontalFlip(p=0.5),
            T.ToTensor(),
        ]
    )
    if image_size > 32:
        resize = [
            T.Resize(int(image_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
        ]
    else:
        resize = [T.Resize((image_size, image_size))]
    test = T.Compose([T.Lambda(to_rgb), *resize, T.ToTensor()])
    return train, test
