"""The FLOP / byte model of one L2P ViT training step, and the matmul rate that turns it into a time floor.

A pre-norm ViT block over S tokens of width D (MLP ratio 4) computes, for R output rows (R = S
except where only some rows are read): keys and values of all S rows (2·S·D² MACs), queries,
projection and MLP of the R rows (R·D² + R·D² + 8·R·D²), and attention QKᵀ and AV (2·R·S·D).
One FLOP = one multiply or add (2 per MAC). The backbone is frozen, so backward computes input
gradients only: each linear layer's backward costs as much as its forward (no weight gradient),
attention's backward twice its forward (dQ, dK from dP; dP, dV from the output gradient).

The port's step: the query pass (all blocks, S₀ = 1 + N rows), the prompted pass (S₁ = 1 + K·Lp + N
rows), backward through all blocks. Ours: the query pass computes only the CLS row in the last
block, the prompted pass's first block reuses the query pass's projections of the frozen rows, and
its last block computes only the K·Lp prompt rows (head 'prompt'); backward likewise.

Bytes: the frozen weights each block pass reads (12·D² parameters) plus the activations it writes
and reads back, modelled as ``ACTIVATION_PASSES`` reads/writes of an (S, D) tensor per block plus
the (heads, S, S) attention matrix once (a fused attention kernel does not write it; counted so the
ceiling is not optimistic). A model, not a measurement: it shows the ceiling, not the exact cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

ACTIVATION_PASSES = 24  # (S, D)-sized reads + writes per block: LN 2+2, qkv 1+3, attn out 3+1, proj 1+1, MLP 1+4+4+1


@dataclass(frozen=True)
class StepShape:
    """One ViT step: batch, image side, patch side, width, depth, heads, pool (M, K, Lp)."""

    batch: int
    image: int
    patch: int
    width: int
    depth: int
    heads: int
    pool_size: int = 10
    top_k: int = 5
    length: int = 5

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def prompt_rows(self) -> int:
        return self.top_k * self.length


def block_flops(tokens: int, rows: int, width: int) -> float:
    """Forward FLOPs of one block for ``rows`` output rows of ``tokens`` (keys and values of all tokens)."""
    kv = tokens * 2 * width * width
    dense = rows * 10 * width * width  # q, proj, MLP (4D up, 4D down)
    attention = 2 * rows * tokens * width
    return 2.0 * (kv + dense + attention)


def block_bytes(tokens: int, width: int, heads: int, itemsize: int) -> float:
    """Bytes one full block pass moves: its weights, its activations (``ACTIVATION_PASSES``), the attention matrix."""
    return float(itemsize * (12 * width * width + ACTIVATION_PASSES * tokens * width + heads * tokens * tokens))


def step_model(shape: StepShape, ours: bool, itemsize: int = 4) -> dict[str, float]:
    """FLOPs and bytes of one step (batch included): 'query', 'prompted', 'backward' and their 'total'."""
    s0, s1 = 1 + shape.patches, 1 + shape.prompt_rows + shape.patches
    d, depth, b = shape.width, shape.depth, shape.batch
    patch_embed = 2.0 * shape.patches * 3 * shape.patch * shape.patch * d
    if ours:
        query = (depth - 1) * block_flops(s0, s0, d) + block_flops(s0, 1, d)
        # first prompted block: projections (qkv) of the K·Lp prompt rows only, the rest of the block on all rows
        first = 2.0 * (shape.prompt_rows * 3 * d * d + s1 * 9 * d * d + 2 * s1 * s1 * d)
        prompted = first + (depth - 2) * block_flops(s1, s1, d) + block_flops(s1, shape.prompt_rows, d)
        backward = 2.0 * ((depth - 1) * _backward_macs(s1, s1, d) + _backward_macs(s1, shape.prompt_rows, d))
    else:
        query = depth * block_flops(s0, s0, d)
        prompted = depth * block_flops(s1, s1, d)
        backward = 2.0 * depth * _backward_macs(s1, s1, d)
    flops = {"query": b * (query + patch_embed), "prompted": b * (prompted + (0 if ours else patch_embed)),
             "backward": b * backward}
    flops["total"] = sum(flops.values())
    passes = (2 * depth + depth) if not ours else (2 * depth - 1 + depth - 1)  # forward block passes + backward
    nbytes = b * passes * block_bytes(s1, d, shape.heads, itemsize)
    return {**{f"{k}_flops": v for k, v in flops.items()}, "bytes": nbytes}


def _backward_macs(tokens: int, rows: int, width: int) -> float:
    """MACs of one block's input-gradient backward: linear layers as their forward, attention twice."""
    return tokens * 2 * width * width + rows * 10 * width * width + 2 * (2 * rows * tokens * width)


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a (size × size) @ (size × size) product in ``dtype`` on ``device`` (best of ``repeats``;
    at size 1024 the CPU bf16 product measured an implausible 800 GFLOP/s on the 2-core machine, 277 at 2048)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
