"""What is checked before a run loads its model or trains: the device, the pool backend on it, the inputs' shape.

Each raises ``ValueError`` naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import torch

from .. import dispatch
from .backbones import Backbone
from .benchmarks import ContinualBenchmark
from .config import PROMPT_METHODS, RunConfig

BACKEND_METHODS = (*PROMPT_METHODS, "coda-prompt")  # the methods whose models run fused ops of ``--backend``


def pick_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda' without a GPU raises ``ValueError``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch sees no CUDA GPU; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_backend(config: RunConfig, device: torch.device) -> None:
    """``ValueError`` when a prompt method (``BACKEND_METHODS``) asks for a backend that cannot run on ``device``
    here."""
    if config.method not in BACKEND_METHODS or config.backend == "auto":
        return
    reason = dispatch.unavailable_reason(config.backend, device.type)
    if reason is not None:
        raise ValueError(
            f"backend: {config.backend!r} cannot run on the {device.type} device here ({reason}); available: "
            f"{['auto', *dispatch.available_backends(device.type)]}"
        )


def check_inputs(benchmark: ContinualBenchmark, backbone: Backbone) -> None:
    """``ValueError`` when an image benchmark's inputs are not the (3, H, W) images the ViT backbone takes."""
    if benchmark.modality == "text":
        return
    size = getattr(getattr(backbone.model, "patch_embed", None), "img_size", None)
    expected = (3, *size) if size is not None else None
    x = benchmark.train[0][0][0]
    shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
    if not hasattr(x, "shape") or len(shape) != 3 or shape[0] != 3 or (expected is not None and shape != expected):
        raise ValueError(
            f"data: benchmark {benchmark.name!r} gives inputs of shape {shape}; the backbone {backbone.name!r} "
            f"takes images of shape {expected or '(3, H, W)'} (image_folder converts and resizes its images; "
            "tensor_file images are used as stored: give 3-channel images of --image-size)"
        )
