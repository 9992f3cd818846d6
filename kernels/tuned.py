"""GPU autotuning of the element-wise kernels (their bits do not depend on the config, so tuning
cannot break determinism). Under TRITON_INTERPRET=1 there is no driver to time with: the plain
kernels are exported and the launcher passes block sizes itself (``AUTOTUNED`` is False).
"""

import os

import triton

from .pool_backward import grad_x_kernel as _grad_x_kernel
from .pool_forward import prepend_kernel as _prepend_kernel

AUTOTUNED = os.environ.get("TRITON_INTERPRET") != "1"


def _configs(rows: tuple[int, ...], cols: tuple[int, ...], row_name: str) -> list:
    return [
        triton.Config({row_name: r, "BLOCK_D": c}, num_warps=w)
        for r in rows
        for c in cols
        for w in (4, 8)
        if r * c <= 8192
    ]


def _tune(kernel, configs: list, key: list[str]):
    return triton.autotune(configs=configs, key=key)(kernel) if AUTOTUNED else kernel


prepend_kernel = _tune(_prepend_kernel, _configs((8, 16, 32, 64), (64, 128, 256), "BLOCK_T"), ["N", "D", "LP"])
grad_x_kernel = _tune(_grad_x_kernel, _configs((8, 16, 32, 64), (64, 128, 256), "BLOCK_N"), ["N", "D", "QUERY"])
