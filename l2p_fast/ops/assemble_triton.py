"""Host launchers of the Triton sequence assembly (device code: ``l2p_fast.kernels.assemble``).

Called inside the ``l2p_fast::assemble_triton`` ops (``l2p_fast/ops/assemble.py``). Inputs are strided
views as they come (no copies). Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..modes import promoted_dtype
from .triton_launch import kernels, pow2

MAX_BLOCK_D = 1024


def _block_d(width: int) -> int:
    return pow2(width, low=1, high=MAX_BLOCK_D)


def launch_assemble(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> Tensor:
    """[cls (1|B, 1, D), prompt[idx] (B, K·Lp, D), x (B, N, D)] + pos (1, S, D) → (B, S, D), promoted dtype."""
    device = kernels()[3]
    batch, tokens, width = x.shape
    pool_size, length = prompt.shape[:2]
    prompt_len = idx.shape[1] * length
    seq = 1 + prompt_len + tokens
    dtype = promoted_dtype(x.dtype, prompt.dtype, cls.dtype, None if pos is None else pos.dtype)
    out = torch.empty((batch, seq, width), dtype=dtype, device=x.device)
    block_d = _block_d(width)
    block_r = kernels()[2].assemble_rows(seq, block_d)  # the GPU table (l2p_fast/kernels/tuned.py)
    grid = (batch, -(-seq // block_r))
    pos_arg = pos if pos is not None else out
    device.assemble_kernel[grid](
        x, prompt, idx, cls, pos_arg, out,
        tokens, width, pool_size, length, prompt_len, seq,
        *x.stride(), *prompt.stride(), *idx.stride(),
        0 if cls.shape[0] == 1 else cls.stride(0), cls.stride(2),
        pos_arg.stride(1), pos_arg.stride(2),
        HAS_POS=pos is not None, ACC_FP64=dtype == torch.float64, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def launch_prompt_grad(grad: Tensor, idx: Tensor, pool_size: int, length: int) -> Tensor:
    """Per-prompt grad (M, Lp, D): Σ of grad's rows 1 + j·Lp + l over every (b, j) with idx[b, j] = m."""
    device = kernels()[3]
    batch, _, width = grad.shape
    out = torch.empty((pool_size, length, width), dtype=grad.dtype, device=grad.device)
    block_d = _block_d(width)
    grid = (pool_size * length, -(-width // block_d))
    device.prompt_grad_kernel[grid](
        grad, idx, out,
        batch, idx.shape[1], width, length,
        *grad.stride(), *idx.stride(),
        ACC_FP64=grad.dtype == torch.float64, BLOCK_D=block_d,
    )  # fmt: skip
    return out
