"""Triton device code of the prefix gather (host launchers: l2p_fast/ops/prefix_gather_triton.py).

``gather_kernel``: one program per (layer·half lc, tile of BLOCK_R row elements); it walks the B·K
selected ids in order and copies prompt row (lc, idx[n]) to output row n of that (lc), at the place
the layout asks (batch first or not). ``gather_grad_kernel``: one program per (lc, prompt m, tile),
summing the gradient rows of every n with idx[n] == m in n order (deterministic, no atomics). Ids
outside [0, M) are clamped into it, as in every backend.
"""

import triton
import triton.language as tl

from .assemble import _round_to


@triton.jit
def gather_kernel(
    prompt_ptr, idx_ptr, out_ptr,
    dual, pool_size, batch, top_k, row,
    BATCH_FIRST: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    lc = tl.program_id(0)
    layer = lc // dual
    c = lc % dual
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < row
    for n in range(0, batch * top_k):
        m = tl.load(idx_ptr + n)
        m = tl.minimum(tl.maximum(m, 0), pool_size - 1)
        v = tl.load(prompt_ptr + (lc * pool_size + m) * row + r, mask=rmask, other=0.0)
        if BATCH_FIRST:
            b = n // top_k
            j = n % top_k
            dest = ((layer * batch + b) * dual + c) * top_k + j
        else:
            dest = lc * batch * top_k + n
        tl.store(out_ptr + dest * row + r, v, mask=rmask)


@triton.jit
def gather_grad_kernel(
    grad_ptr, idx_ptr, out_ptr,
    dual, pool_size, batch, top_k, row,
    BATCH_FIRST: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    lcm = tl.program_id(0)  # (layer·half) · M + prompt
    lc = lcm // pool_size
    m = lcm % pool_size
    layer = lc // dual
    c = lc % dual
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < row
    if ACC_FP64:
        acc = tl.zeros((BLOCK_R,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for n in range(0, batch * top_k):
        sel = tl.load(idx_ptr + n)
        sel = tl.minimum(tl.maximum(sel, 0), pool_size - 1)
        if sel == m:
            if BATCH_FIRST:
                b = n // top_k
                j = n % top_k
                src = ((layer * batch + b) * dual + c) * top_k + j
            else:
                src = lc * batch * top_k + n
            acc += tl.load(grad_ptr + src * row + r, mask=rmask, other=0.0).to(acc.dtype)
    if ACC_FP64:
        tl.store(out_ptr + lcm * row + r, acc.to(out_ptr.dtype.element_ty), mask=rmask)
    else:
        tl.store(out_ptr + lcm * row + r, _round_to(acc, out_ptr.dtype.element_ty), mask=rmask)
