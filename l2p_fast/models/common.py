"""Pieces shared by the prompted ViT and the prompted text encoder: heads, task mask, checks.

Shapes: B batch, S sequence (1 + K·Lp + N), D width, M pool, K top-k, Lp prompt length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..pool import OUTPUT_ORDER

HEAD_TYPES = ("token", "prompt", "token+prompt", "gap")
# which rows the last block/layer computes: every row, or only those the head reads
FINAL_TOKENS = ("all", "head")
# the pool outputs a prompted model passes on (the port's dict, without the materialised sequence)
POOL_KEYS = tuple(key for key in OUTPUT_ORDER if key != "prompted_embedding")


def check_head_type(head_type: str) -> None:
    """Raise ``ValueError`` unless ``head_type`` is one of ``HEAD_TYPES``."""
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type: expected one of {HEAD_TYPES}, got {head_type!r}")


def check_final_tokens(final_tokens: str) -> None:
    """Raise ``ValueError`` unless ``final_tokens`` is one of ``FINAL_TOKENS``."""
    if final_tokens not in FINAL_TOKENS:
        raise ValueError(f"final_tokens: expected one of {FINAL_TOKENS}, got {final_tokens!r}")


def pool_tokens(x: Tensor, head_type: str, prompt_len: int, mask: Tensor | None = None) -> Tensor:
    """Pooled feature (B, D) of the final tokens x (B, S, D) laid out as [CLS, K·Lp prompts, rest].

    'token': CLS; 'prompt': mean of the prompt outputs; 'token+prompt': mean of CLS and prompts;
    'gap': mean of all tokens (of the valid ones when ``mask`` (B, S) is given).
    """
    if head_type == "token":
        return x[:, 0]
    if head_type == "prompt":
        return x[:, 1 : 1 + prompt_len].mean(dim=1)
    if head_type == "token+prompt":
        return x[:, : 1 + prompt_len].mean(dim=1)
    if head_type == "gap":
        if mask is None:
            return x.mean(dim=1)
        weight = mask.to(x.dtype).unsqueeze(-1)
        return (x * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
    raise ValueError(f"head_type: expected one of {HEAD_TYPES}, got {head_type!r}")


def head_rows(head_type: str, prompt_len: int, seq_len: int) -> tuple[int, int]:
    """Rows ``start:stop`` of [CLS, K·Lp prompts, rest] (length S = ``seq_len``) that ``head_type`` reads.

    'token': 0:1; 'prompt': 1:1+K·Lp; 'token+prompt': 0:1+K·Lp; 'gap': 0:S (no mask).
    """
    if head_type == "token":
        return 0, 1
    if head_type == "prompt":
        return 1, 1 + prompt_len
    if head_type == "token+prompt":
        return 0, 1 + prompt_len
    if head_type == "gap":
        return 0, seq_len
    raise ValueError(f"head_type: expected one of {HEAD_TYPES}, got {head_type!r}")


def pool_rows(rows: Tensor, head_type: str) -> Tensor:
    """``pool_tokens`` on just the rows ``head_rows`` selected (B, R, D) → (B, D): CLS for 'token', else their mean."""
    check_head_type(head_type)
    return rows[:, 0] if head_type == "token" else rows.mean(dim=1)


def task_prompt_mask(task_id: int, top_k: int, pool_size: int, batch: int, device: torch.device) -> Tensor | None:
    """Train-time task mask (B, K): ids t·K … t·K+K−1, or None when t < 0 or the range exceeds M."""
    start, end = task_id * top_k, (task_id + 1) * top_k
    if task_id < 0 or end > pool_size:
        return None
    return torch.arange(start, end, device=device).unsqueeze(0).expand(batch, -1)


def freeze_all_but(module: nn.Module, trainable: tuple[str, ...]) -> None:
    """Set ``requires_grad`` True only for parameters whose name starts with one of ``trainable``."""
    for name, param in module.named_parameters():
        param.requires_grad_(name.startswith(trainable))


def walk_modules(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and all its submodules, like ``modules()`` without the name bookkeeping (runs every step)."""
    yield module
    for child in module._modules.values():
        if child is not None:
            yield from walk_modules(child)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode inside the block, then restore every submodule's flag.

    The flags are set directly rather than through ``train()``/``eval()`` (which recurse through
    ``__setattr__`` and cost ~0.25 ms on a small ViT, every step): inside the block every submodule
    reads ``training`` False, as after ``eval()``.
    """
    switched = [m for m in walk_modules(module) if m.training]
    for m in switched:
        m.__dict__["training"] = False
    try:
        yield
    finally:
        for m in switched:
            m.__dict__["training"] = True
