"""The prefix-gather Triton kernels compile ahead of time for a real GPU (sm_90 cubin) in every dtype and
layout flag the launchers use: catches what the interpreter lets through. Runs in a subprocess, because
TRITON_INTERPRET=1 (set for the other tests) replaces the kernels by objects the compiler cannot read."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the triton package is not installed")

SCRIPT = r"""
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from l2p_fast.kernels import prefix_gather as k

ints = {"dual": "i32", "pool_size": "i32", "batch": "i32", "top_k": "i32", "row": "i32"}
for dtype, batch_first in itertools.product(("fp32", "bf16", "fp16", "fp64"), (True, False)):
    sig = {"prompt_ptr": "*" + dtype, "idx_ptr": "*i64", "out_ptr": "*" + dtype, **ints,
           "BATCH_FIRST": "constexpr", "BLOCK_R": "constexpr"}
    c = triton.compile(ASTSource(fn=k.gather_kernel, signature=sig, constexprs={(8,): batch_first, (9,): 1024}),
                       target=GPUTarget("cuda", 90, 32))
    assert c.asm["cubin"], (dtype, batch_first)
    sig = {"grad_ptr": "*" + dtype, "idx_ptr": "*i64", "out_ptr": "*" + dtype, **ints,
           "BATCH_FIRST": "constexpr", "ACC_FP64": "constexpr", "BLOCK_R": "constexpr"}
    cx = {(8,): batch_first, (9,): dtype == "fp64", (10,): 1024}
    c = triton.compile(ASTSource(fn=k.gather_grad_kernel, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32))
    assert c.asm["cubin"], (dtype, batch_first)
print("compiled 16")
"""


def test_kernels_compile_for_sm90() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled 16" in result.stdout
