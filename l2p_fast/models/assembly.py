"""One-pass sequence assembly: ``[CLS + pos_cls, prompts + pos, tokens + pos]`` written once.

The port builds the prompted ViT input with ``cat(prompts, x)``, ``cat(cls, ·)`` and ``· + pos``:
three fresh full-size (B, S, D) tensors. ``assemble`` writes the final (B, 1 + K·Lp + N, D)
sequence directly from x (B, N, D), the pool's prompts (M, Lp, D), the selected ids idx (B, K), the
CLS token (1 or B, 1, D) and the positional table (1, 1 + K·Lp + N, D) (or None: no positions, as
for a BERT encoder that adds its own). ``assemble_reference`` is the ground truth (the port's
concat, concat, add); the fused backends (native C++/CUDA op, Triton) must match it bit-exactly.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

ASSEMBLY_BACKENDS = ("reference", "native", "triton")
# device type -> assembly backends `auto` tries, best first
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "native", "reference"),
    "cpu": ("native", "reference"),
}
# a pool backend name requested explicitly -> the assembly backend that goes with it
POOL_TO_ASSEMBLY = {"reference": "reference", "cpu": "native", "cuda": "native", "triton": "triton"}


def output_dtype(x: Tensor, prompt: Tensor, cls: Tensor, pos: Tensor | None) -> torch.dtype:
    """The dtype ``torch.cat`` + ``add`` would give: the promotion of every input's dtype."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, prompt.dtype), cls.dtype)
    return dtype if pos is None else torch.promote_types(dtype, pos.dtype)


def assemble_reference(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    """The port's way: ``cat([cls, prompt[idx] as (B, K·Lp, D), x], 1) + pos`` → (B, 1 + K·Lp + N, D)."""
    batch, k = idx.shape
    batched_prompt = prompt[idx].reshape(batch, k * prompt.shape[1], prompt.shape[2])
    seq = torch.cat([batched_prompt, x], dim=1)
    seq = torch.cat([cls.expand(batch, -1, -1), seq], dim=1)
    return seq if pos is None else seq + pos


def validate_assembly(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> None:
    """Check shapes, dtypes and devices of ``assemble``'s inputs (clear errors before any kernel)."""
    for name, t in (("x", x), ("prompt", prompt), ("cls", cls)) + ((("pos", pos),) if pos is not None else ()):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D tensor, got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
    batch, tokens, width = x.shape
    if batch < 1:
        raise ValueError(f"x: expected B >= 1, got shape {tuple(x.shape)}")
    if prompt.shape[0] < 1 or prompt.shape[1] < 1 or prompt.shape[2] != width:
        raise ValueError(f"prompt: expected (M, Lp, D) with M, Lp >= 1 and D = {width}, got {tuple(prompt.shape)}")
    if not isinstance(idx, Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"idx: expected an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.dim() != 2 or idx.shape[0] != batch or idx.shape[1] < 1 or idx.device != x.device:
        raise ValueError(
            f"idx: expected (B, K) with B = {batch}, K >= 1 on {x.device}, got {tuple(idx.shape)} on {idx.device}"
        )
    if cls.shape[0] not in (1, batch) or cls.shape[1] != 1 or cls.shape[2] != width:
        raise ValueError(f"cls: expected (1, 1, {width}) or ({batch}, 1, {width}), got {tuple(cls.shape)}")
    seq_len = 1 + idx.shape[1] * prompt.shape[1] + tokens
    if pos is not None and tuple(pos.shape) != (1, seq_len, width):
        raise ValueError(f"pos: expected (1, 1 + K·Lp + N, D) = {(1, seq_len, width)}, got {tuple(pos.shape)}")


def _native_reason(device_type: str) -> str | None:
    from .. import _native

    if device_type not in ("cpu", "cuda"):
        return f"the native op runs on cpu/cuda tensors, got {device_type!r}"
    if not _native.is_built():
        return _native.LOAD_ERROR
    if not hasattr(torch.ops.l2p_fast, "assemble"):
        return "l2p_fast._C has no op l2p_fast::assemble (rebuild the extension)"
    if device_type == "cuda" and not _native.built_with_cuda():
        return "l2p_fast._C was built without CUDA"
    return None


def _triton_reason(device_type: str) -> str | None:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device_type not in ("cpu", "cuda"):
        return f"Triton runs on cuda tensors, got {device_type!r}"
    try:
        importlib.import_module("l2p_fast.kernels.assemble")
    except ImportError as error:
        return f"importing l2p_fast.kernels.assemble failed: {error}"
    return None


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why assembly backend ``name`` cannot run on ``device_type`` (None when it can)."""
    if name == "reference":
        return None
    if name == "native":
        return _native_reason(device_type)
    if name == "triton":
        return _triton_reason(device_type)
    return f"unknown assembly backend {name!r}; known: {ASSEMBLY_BACKENDS}"


_RESOLVED: dict[tuple[str, str], str] = {}


def clear_cache() -> None:
    """Forget the backends resolved so far (for tests that change the environment)."""
    _RESOLVED.clear()


@torch.compiler.assume_constant_result
def resolve(requested: str, device_type: str) -> str:
    """Assembly backend for a model's ``backend`` argument ('auto' or a pool backend name).

    ``auto`` picks the best available by static facts only (quietly falling back to the
    reference); an explicit pool backend maps to its assembly twin and raises if that cannot run.
    The answer is cached per (request, device type), and is a constant to ``torch.compile``.
    """
    key = (requested, device_type)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(requested, device_type)
    return _RESOLVED[key]


def _resolve(requested: str, device_type: str) -> str:
    if requested != "auto":
        name = POOL_TO_ASSEMBLY.get(requested, requested)
        reason = unavailable_reason(name, device_type)
        if reason is not None:
            raise RuntimeError(f"assembly backend {name!r} is not available on {device_type!r}: {reason}")
        return name
    for name in AUTO_PREFERENCE.get(device_type, ("reference",)):
        reason = unavailable_reason(name, device_type)
        if reason is None:
            return name
        logger.debug("assembly 'auto' on %s skips %r: %s", device_type, name, reason)
    return "reference"


def assemble(
    x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None, *, backend: str = "auto"
) -> Tensor:
    """Write ``[cls, prompt[idx], x] + pos`` once → (B, 1 + K·Lp + N, D), differentiable in every float input.

    x (B, N, D) (N may be 0), prompt (M, Lp, D), idx (B, K) int64 ids in [0, M), cls (1 | B, 1, D),
    pos (1, 1 + K·Lp + N, D) or None. Output dtype: the promotion of the inputs' dtypes.
    ``backend``: 'auto', a pool backend name ('reference', 'cpu', 'cuda', 'triton') or an assembly
    backend name ('native'). Ids out of range are not checked here (the pool produced them).
    """
    validate_assembly(x, prompt, idx, cls, pos)
    name = resolve(backend, x.device.type)
    if name == "reference":
        return assemble_reference(x, prompt, idx, cls, pos)
    from .. import ops

    if name == "native":
        return ops.assemble(x, prompt, idx, cls, pos)
    return ops.assemble_triton(x, prompt, idx, cls, pos)
