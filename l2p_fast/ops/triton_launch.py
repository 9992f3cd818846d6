"""What the Triton host launchers share: block-size helpers, the device guard, the forward-AD guard.

The device code is imported lazily (``kernels()``), on the first launch, so ``TRITON_INTERPRET`` may
still be set after ``l2p_fast`` is imported. Under the interpreter the launchers pick few, big
programs (it pays per operation, not per element), unless ``GPU_BLOCKS_IN_INTERPRETER`` is set (tests
set it to run the GPU block sizes, every multi-tile loop, under the interpreter too).
"""

from __future__ import annotations

import contextlib
import functools
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ..dispatch import triton_interpreting

GPU_BLOCKS_IN_INTERPRETER = False


def big_blocks() -> bool:
    """Few, big programs: under the interpreter, unless the GPU block sizes are asked for."""
    return triton_interpreting() and not GPU_BLOCKS_IN_INTERPRETER


@functools.cache
def kernels() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """The device-code modules (pool_forward, pool_backward, tuned, assemble) of ``l2p_fast.kernels``."""
    from l2p_fast.kernels import assemble, pool_backward, pool_forward, tuned

    return pool_forward, pool_backward, tuned, assemble


def pow2(n: int, low: int = 16, high: int = 1 << 30) -> int:
    """The next power of two ≥ n, clamped to [low, high]."""
    return max(low, min(high, 1 << max(0, (int(n) - 1).bit_length())))


def device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU (a no-op context for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def reject_forward_ad(op: str, *tensors: Tensor | None) -> None:
    """The Triton ops have no forward-mode AD: raise the same clear error as the native backend."""
    if forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        raise RuntimeError(
            f"l2p_fast: the Triton {op} (backend='triton') has no forward-mode AD (jvp); an input carries a "
            "forward gradient (torch.autograd.forward_ad). Use backend='reference' for forward-mode AD."
        )
