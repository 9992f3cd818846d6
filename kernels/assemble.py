"""Triton device code of the one-pass sequence assembly (host launchers: l2p_fast/ops/assemble_triton.py).

``assemble_kernel``: one program per (sample b, tile of BLOCK_R sequence rows); each row of the final
(B, 1 + K·Lp + N, D) buffer is read from its one source — CLS, the selected prompt row or the
token — and written once, with the positional row added. ``prompt_grad_kernel``: one program per
(prompt m, prompt row l, D tile), summing the gradient rows of every (b, j) with idx[b, j] == m in
(b, j) order (deterministic, no atomics). Every load and store is masked to the tensors' bounds;
ids outside [0, M) are clamped into it, as in every backend.
"""

import triton
import triton.language as tl


@triton.jit
def _round_to(v, out_dtype: tl.constexpr):
    """fp32 → out_dtype, round-to-nearest-even. bf16 is rounded by hand: Triton's interpreter truncates."""
    if out_dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(out_dtype)


@triton.jit
def assemble_kernel(
    x_ptr, prompt_ptr, idx_ptr, cls_ptr, pos_ptr, out_ptr,
    tokens, width, pool_size, length, prompt_len, seq,
    xs0, xs1, xs2, ps0, ps1, ps2, is0, is1, cs0, cs2, qs1, qs2,
    HAS_POS: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_seq = rows < seq
    is_cls = rows == 0
    is_prompt = (rows >= 1) & (rows <= prompt_len) & in_seq
    is_token = (rows > prompt_len) & in_seq
    slot = tl.where(is_prompt, rows - 1, 0)
    j = slot // length
    lrow = slot % length
    ids = tl.load(idx_ptr + b * is0 + j * is1, mask=is_prompt, other=0)
    ids = tl.minimum(tl.maximum(ids, 0), pool_size - 1)  # out-of-range ids are clamped, as in every backend
    n = tl.where(is_token, rows - 1 - prompt_len, 0)
    out_dtype = out_ptr.dtype.element_ty
    for d0 in range(0, width, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < width
        c = tl.load(cls_ptr + b * cs0 + d * cs2, mask=dmask, other=0.0)
        p = tl.load(
            prompt_ptr + ids[:, None] * ps0 + lrow[:, None] * ps1 + d[None, :] * ps2,
            mask=is_prompt[:, None] & dmask[None, :],
            other=0.0,
        )
        t = tl.load(
            x_ptr + b * xs0 + n[:, None] * xs1 + d[None, :] * xs2,
            mask=is_token[:, None] & dmask[None, :],
            other=0.0,
        )
        c = tl.broadcast_to(c.to(out_dtype)[None, :], (BLOCK_R, BLOCK_D))
        v = tl.where(is_cls[:, None], c, tl.where(is_prompt[:, None], p.to(out_dtype), t.to(out_dtype)))
        smask = in_seq[:, None] & dmask[None, :]
        if HAS_POS:
            q = tl.load(pos_ptr + rows[:, None] * qs1 + d[None, :] * qs2, mask=smask, other=0.0)
            if ACC_FP64:
                v = (v.to(tl.float64) + q.to(tl.float64)).to(out_dtype)
            else:
                v = _round_to(v.to(tl.float32) + q.to(tl.float32), out_dtype)
        tl.store(out_ptr + b * seq * width + rows[:, None] * width + d[None, :], v, mask=smask)


@triton.jit
def prompt_grad_kernel(
    grad_ptr, idx_ptr, out_ptr,
    batch, top_k, width, length,
    gs0, gs1, gs2, is0, is1,
    ACC_FP64: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)  # r = m * length + l
    pool_size = tl.num_programs(0) // length  # the grid has one program per prompt row
    m = r // length
    lrow = r % length
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < width
    if ACC_FP64:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for b in range(0, batch):
        for j in range(0, top_k):
            sel = tl.load(idx_ptr + b * is0 + j * is1)
            sel = tl.minimum(tl.maximum(sel, 0), pool_size - 1)
            if sel == m:
                row = tl.load(grad_ptr + b * gs0 + (1 + j * length + lrow) * gs1 + d * gs2, mask=dmask, other=0.0)
                acc += row.to(acc.dtype)
    if ACC_FP64:
        tl.store(out_ptr + r * width + d, acc.to(out_ptr.dtype.element_ty), mask=dmask)
    else:
        tl.store(out_ptr + r * width + d, _round_to(acc, out_ptr.dtype.element_ty), mask=dmask)
