"""Argument checks shared by every backend: clear errors raised before any kernel runs.

Each message names the argument, what was expected and what was given.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import EMBEDDING_KEYS

INITS = ("uniform", "zero")
BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def validate_config(
    *,
    length: int,
    embed_dim: int,
    embedding_key: str,
    prompt_init: str,
    prompt_pool: bool,
    pool_size: int | None,
    top_k: int | None,
    prompt_key_init: str,
    backend: str,
) -> None:
    """Check the constructor arguments of ``FusedPromptPool`` (SPEC §3)."""
    _check_positive_int("length", length)
    _check_positive_int("embed_dim", embed_dim)
    _check_choice("embedding_key", embedding_key, EMBEDDING_KEYS)
    _check_choice("prompt_init", prompt_init, INITS)
    _check_choice("prompt_key_init", prompt_key_init, INITS)
    _check_choice("backend", backend, BACKENDS)
    if not prompt_pool:
        return
    if pool_size is None or top_k is None:
        raise ValueError(
            f"pool_size, top_k: prompt_pool=True needs both, got pool_size={pool_size!r}, top_k={top_k!r}"
        )
    _check_positive_int("pool_size", pool_size)
    _check_positive_int("top_k", top_k)
    if top_k > pool_size:
        raise ValueError(f"top_k: expected 1 <= top_k <= pool_size={pool_size}, got {top_k}")


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def _check_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on the parameters' device {device}, got {t.device}")


def validate_forward(
    x_embed: Tensor,
    prompt_mask: Tensor | None,
    cls_features: Tensor | None,
    *,
    embed_dim: int,
    pool_size: int | None,
    prompt_pool: bool,
    device: torch.device,
) -> None:
    """Check the forward inputs (SPEC §4) against the module's configuration.

    x_embed (B, N, D) float; cls_features (B, D) float or None; prompt_mask (B, K') integer ids
    in [0, M) or None. All on ``device`` (the parameters' device).
    """
    _check_float("x_embed", x_embed)
    if x_embed.dim() != 3:
        raise ValueError(f"x_embed: expected a 3-D tensor (B, N, D), got shape {tuple(x_embed.shape)}")
    batch, _, width = x_embed.shape
    if width != embed_dim:
        raise ValueError(f"x_embed: expected last dim D = embed_dim = {embed_dim}, got {width}")
    if batch < 1 or x_embed.shape[1] < 1:
        raise ValueError(f"x_embed: expected B >= 1 and N >= 1, got shape {tuple(x_embed.shape)}")
    _check_device("x_embed", x_embed, device)
    if cls_features is not None:
        _check_float("cls_features", cls_features)
        if tuple(cls_features.shape) != (batch, embed_dim):
            raise ValueError(
                f"cls_features: expected shape (B, D) = {(batch, embed_dim)}, got {tuple(cls_features.shape)}"
            )
        _check_device("cls_features", cls_features, device)
    if prompt_mask is not None and prompt_pool:
        _validate_mask(prompt_mask, batch, pool_size, device)


def _validate_mask(prompt_mask: Tensor, batch: int, pool_size: int | None, device: torch.device) -> None:
    if not isinstance(prompt_mask, Tensor):
        raise TypeError(f"prompt_mask: expected a torch.Tensor, got {type(prompt_mask).__name__}")
    if prompt_mask.is_floating_point() or prompt_mask.is_complex() or prompt_mask.dtype == torch.bool:
        raise TypeError(f"prompt_mask: expected an integer tensor of prompt ids, got dtype {prompt_mask.dtype}")
    if prompt_mask.dim() != 2 or prompt_mask.shape[0] != batch or prompt_mask.shape[1] < 1:
        raise ValueError(
            f"prompt_mask: expected shape (B, K') with B = {batch} and K' >= 1, got {tuple(prompt_mask.shape)}"
        )
    _check_device("prompt_mask", prompt_mask, device)
    if torch.compiler.is_compiling():
        return  # value checks would force a host sync inside the graph
    low, high = int(prompt_mask.min()), int(prompt_mask.max())
    if low < 0 or high >= pool_size:
        raise ValueError(f"prompt_mask: expected ids in [0, pool_size={pool_size}), got values in [{low}, {high}]")
