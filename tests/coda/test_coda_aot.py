"""The CODA Triton kernels compile ahead of time for real GPUs (sm_80 and sm_90 cubins) in every dtype and flag the
launchers use, at the launchers' GPU block sizes: catches what the interpreter lets through. Runs in a subprocess,
because TRITON_INTERPRET=1 (set for the other tests) replaces the kernels by objects the compiler cannot read."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the triton package is not installed")

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from l2p_fast.kernels import coda as k

count = 0
for arch in (80, 90):
    target = GPUTarget("cuda", arch, 32)
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        sig = {"q_ptr": "*" + dtype, "k_ptr": "*" + dtype, "a_ptr": "*" + dtype, "w_ptr": "*" + dtype,
               "key_dim": "i32", "used": "i32", "ACC_FP64": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_D": "constexpr"}
        c = triton.compile(ASTSource(fn=k.coda_weights_kernel, signature=sig,
                                     constexprs={(6,): dtype == "fp64", (7,): 16, (8,): 128}), target=target)
        assert c.asm["cubin"], ("weights", dtype, arch)
        sig = {"c_ptr": "*" + dtype, "src_ptr": "*" + dtype, "out_ptr": "*" + dtype, "count": "i32", "row": "i32",
               "stride_ci": "i32", "stride_cj": "i32", "lo": "i32", "hi": "i32", "ACC_FP64": "constexpr",
               "BLOCK_R": "constexpr"}
        c = triton.compile(ASTSource(fn=k.coda_rows_kernel, signature=sig,
                                     constexprs={(9,): dtype == "fp64", (10,): 1024}), target=target)
        assert c.asm["cubin"], ("rows", dtype, arch)
        for has_base in (True, False):
            sig = {"g_ptr": "*" + dtype, "p_ptr": "*" + dtype, "base_ptr": "*" + (dtype if has_base else acc),
                   "out_ptr": "*" + acc, "used": "i32", "row": "i32", "HAS_BASE": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_R": "constexpr"}
            c = triton.compile(ASTSource(fn=k.coda_rowdot_kernel, signature=sig,
                                         constexprs={(6,): has_base, (7,): 16, (8,): 256}), target=target)
            assert c.asm["cubin"], ("rowdot", dtype, arch, has_base)
        sig = {**{n: "*" + dtype for n in ("q_ptr", "k_ptr", "a_ptr", "w_ptr")}, "g_ptr": "*" + acc,
               **{n: "*" + acc for n in ("gn_ptr", "gs_ptr", "gw_ptr", "rk_ptr")}, "key_dim": "i32", "used": "i32",
               "ACC_FP64": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}
        c = triton.compile(ASTSource(fn=k.coda_grad_factors_kernel, signature=sig,
                                     constexprs={(11,): dtype == "fp64", (12,): 16, (13,): 128}), target=target)
        assert c.asm["cubin"], ("grad factors", dtype, arch)
        sig = {**{n: "*" + dtype for n in ("q_ptr", "k_ptr", "a_ptr")},
               **{n: "*" + acc for n in ("gn_ptr", "gs_ptr", "gw_ptr", "rk_ptr")}, "gk_ptr": "*" + dtype,
               "ga_ptr": "*" + dtype, "batch": "i32", "key_dim": "i32", "used": "i32", "start": "i32", "pool": "i32",
               "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}
        c = triton.compile(ASTSource(fn=k.coda_grad_keys_kernel, signature=sig, constexprs={(14,): 16, (15,): 64}),
                           target=target)
        assert c.asm["cubin"], ("grad keys", dtype, arch)
        sig = {**{n: "*" + dtype for n in ("q_ptr", "k_ptr", "a_ptr")}, "gn_ptr": "*" + acc, "gs_ptr": "*" + acc,
               "gq_ptr": "*" + dtype, "key_dim": "i32", "used": "i32", "BLOCK_D": "constexpr"}
        c = triton.compile(ASTSource(fn=k.coda_grad_query_kernel, signature=sig, constexprs={(8,): 128}),
                           target=target)
        assert c.asm["cubin"], ("grad query", dtype, arch)
        count += 7
print("compiled", count)
"""


def test_coda_kernels_compile_for_sm80_and_sm90() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled 56" in result.stdout
