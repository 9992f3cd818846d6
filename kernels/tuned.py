"""GPU launch parameters of the Triton kernels, chosen from compiler figures, not timings.

Every block size and warp count below was picked from ahead-of-time compiles for sm_80 and sm_90
(``scripts/triton_resources.py``: registers, spills, resident warps per SM; the table is in
docs/design/gpu-resources.md) so that no configuration spills and the copy kernels keep many warps
resident; tests/gpu/test_triton_compile.py fails if one spills. The host launchers
(``l2p_fast/ops/pool_triton.py``, ``assemble_triton.py``) read them here for GPU launches; under the
interpreter they pick their own few, big blocks.

Autotuning covers only the element-wise kernels (their bits do not depend on the config, so tuning
cannot break determinism). Under TRITON_INTERPRET=1 there is no driver to time with: the plain
kernels are exported and the launcher passes block sizes itself (``AUTOTUNED`` is False).
"""

import os

import triton

from .pool_backward import grad_x_kernel as _grad_x_kernel
from .pool_forward import prepend_kernel as _prepend_kernel

AUTOTUNED = os.environ.get("TRITON_INTERPRET") != "1"

# select / vote_gather (one program per batch row): BLOCK_M = 64 with BLOCK_D = 128 spilled ~700 B per
# thread in fp64 and took 211 registers in fp32; at 8 warps ptxas caps registers at 128 and fp64 spilled;
# BLOCK_M <= 32, BLOCK_D <= 64 at 4 warps: 56-142 registers. ptxas still keeps 8-24 bytes on the stack in
# some flag/dtype combinations whatever the blocks (also before the NaN handling; tried the gather tile at
# 1x1024, 2x512, 4x256): tests/gpu/test_triton_compile.py allows select_kernel at most 32 bytes.
SELECT_MAX_BLOCK_M = 32
SELECT_MAX_BLOCK_D = 64
SELECT_WARPS = 4
# grad_query / grad_keys: BLOCK_M = 32 spilled on sm_80 (fp32 with tl.dot: 255 registers + 32 B stack) and
# BLOCK_D = 64 spilled 16 B in grad_query on sm_90; 16 keys by 32 features: 72-80 registers, no spill.
GRAD_BLOCK_M = 16
GRAD_BLOCK_D_DOT = 32
# grad_prompt_kernel: 16 rows × BLOCK_E; BLOCK_E = 512 took 176-184 registers in fp64 (8 resident warps),
# 256: 106-116 (16 warps).
GRAD_PROMPT_MAX_BLOCK_E = 256
# Copy kernels: elements per program (4 warps). The assembly moved 8,192 (219 registers in fp32, 8 warps
# resident per SM, fp64 spilling); 1,024 give 34-54 registers and 36-48 resident warps.
ASSEMBLE_TILE = 1024
# Autotune lists: at most this many elements per thread (fp64 tiles of 64 per thread spilled up to 2.7 KB).
MAX_ELEMENTS_PER_THREAD = 16


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def forward_blocks(n: int, d: int, m: int, k: int, lpd: int) -> dict[str, int]:
    """Blocks and warps of ``select_kernel`` / ``vote_gather_kernel`` on a GPU (N, D, M, K, Lp·D)."""
    block_e = _pow2(lpd, 16, 1024)
    return {"BLOCK_D": _pow2(d, 16, SELECT_MAX_BLOCK_D), "BLOCK_N": 32, "BLOCK_M": _pow2(m, 16, SELECT_MAX_BLOCK_M),
            "BLOCK_S": max(2, 4096 // block_e), "BLOCK_E": block_e, "num_warps": SELECT_WARPS}


def assemble_rows(seq: int, block_d: int) -> int:
    """Sequence rows per program of ``assemble_kernel``: ASSEMBLE_TILE elements on a GPU (8,192 under the
    interpreter, which pays per program)."""
    tile = ASSEMBLE_TILE if AUTOTUNED else 8192
    return max(1, min(64, triton.next_power_of_2(max(seq, 1)), tile // block_d))


def _configs(rows: tuple[int, ...], cols: tuple[int, ...], row_name: str) -> list:
    return [
        triton.Config({row_name: r, "BLOCK_D": c}, num_warps=w)
        for r in rows
        for c in cols
        for w in (4, 8)
        if r * c <= MAX_ELEMENTS_PER_THREAD * 32 * w
    ]


def _tune(kernel, configs: list, key: list[str]):
    return triton.autotune(configs=configs, key=key)(kernel) if AUTOTUNED else kernel


prepend_kernel = _tune(_prepend_kernel, _configs((8, 16, 32, 64), (64, 128, 256), "BLOCK_T"), ["N", "D", "LP"])
grad_x_kernel = _tune(_grad_x_kernel, _configs((8, 16, 32, 64), (64, 128, 256), "BLOCK_N"), ["N", "D", "QUERY"])
