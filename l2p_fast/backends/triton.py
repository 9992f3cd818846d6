"""The Triton backend: host launchers (allocate, pick blocks, launch ``l2p_fast.kernels``) and the adapter.

Runs on CUDA tensors, or on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1``
was set before the first launch (the kernel modules are imported lazily, on first use). The ops
that wrap these launchers (schemas, fakes, autograd) live in ``l2p_fast/ops.py``.

Block sizes depend on shapes only. Kernels whose bits depend on the block sizes (every reduction)
use fixed sizes, so a gradient is bit-identical in every process; only the element-wise kernels
(``prepend_kernel``, ``grad_x_kernel``) are autotuned, and only on a GPU (the interpreter has no
driver to time with). Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor

from .. import ops
from ..reference import compute_dtype

QUERY_MODES = {"mean": 0, "max": 1, "mean_max": 2, "cls": 1}  # 'cls' with cls_features given → 3
QUERY_FROM_CLS = 3
TRITON_FOUND = importlib.util.find_spec("triton") is not None  # module constant: torch.compile reads it freely


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why Triton cannot run on ``device_type`` ('cuda' with a GPU, or 'cpu' under TRITON_INTERPRET=1)."""
    if not TRITON_FOUND:
        return "the triton package is not installed (pip install triton)"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        if _interpreting():
            return None
        return "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before importing"
    return f"Triton runs on 'cuda' tensors (or 'cpu' under TRITON_INTERPRET=1), got {device_type!r} tensors"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tests set this to run the GPU block sizes (every multi-tile loop) under the interpreter too.
GPU_BLOCKS_IN_INTERPRETER = False


def _big_blocks() -> bool:
    """Few, big programs under the interpreter (it pays per operation, not per element)."""
    return _interpreting() and not GPU_BLOCKS_IN_INTERPRETER


@functools.cache
def _kernels() -> tuple[ModuleType, ModuleType, ModuleType]:
    from l2p_fast.kernels import pool_backward, pool_forward, tuned

    return pool_forward, pool_backward, tuned


def _pow2(n: int, low: int = 16, high: int = 1 << 30) -> int:
    """The next power of two ≥ n, clamped to [low, high]."""
    return max(low, min(high, 1 << max(0, (int(n) - 1).bit_length())))


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullContext()


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _forward_blocks(n: int, d: int, m: int, k: int, lpd: int) -> dict[str, int]:
    if _big_blocks():
        block_d = _pow2(d, high=1024)
        block_e = _pow2(lpd, high=1 << 16)
        return {
            "BLOCK_D": block_d,
            "BLOCK_N": _pow2(n, high=max(16, (1 << 16) // block_d)),
            "BLOCK_M": _pow2(m, high=1024),
            "BLOCK_S": _pow2(k, low=1, high=max(1, (1 << 18) // block_e)),
            "BLOCK_E": block_e,
        }
    block_e = _pow2(lpd, high=1024)
    return {"BLOCK_D": _pow2(d, high=128), "BLOCK_N": 32, "BLOCK_M": _pow2(m, high=64),
            "BLOCK_S": max(2, 4096 // block_e), "BLOCK_E": block_e}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_pool_args(
    x_embed: Tensor, prompt: Tensor, keys: Tensor, cls_features: Tensor | None, prompt_mask: Tensor | None,
    query_mode: int, top_k: int,
) -> None:
    """Shape, dtype and device checks of ``launch_pool_forward``'s arguments (no device sync), before any launch."""
    _require(x_embed.dim() == 3, f"x_embed: expected (B, N, D), got shape {tuple(x_embed.shape)}")
    batch, tokens, width = x_embed.shape
    _require(batch >= 1 and tokens >= 1, f"x_embed: expected B >= 1 and N >= 1, got shape {tuple(x_embed.shape)}")
    _require(prompt.dim() == 3 and prompt.shape[2] == width,
             f"prompt: expected (M, Lp, D) with D = {width}, got shape {tuple(prompt.shape)}")
    pool_size = prompt.shape[0]
    _require(tuple(keys.shape) == (pool_size, width),
             f"keys: expected shape {(pool_size, width)}, got {tuple(keys.shape)}")
    _require(query_mode in (0, 1, 2, QUERY_FROM_CLS), f"query_mode: expected 0, 1, 2 or 3, got {query_mode}")
    if query_mode == QUERY_FROM_CLS:
        _require(cls_features is not None and tuple(cls_features.shape) == (batch, width),
                 f"cls_features: expected shape {(batch, width)} for query_mode 3, got "
                 f"{None if cls_features is None else tuple(cls_features.shape)}")
    if prompt_mask is None:
        _require(1 <= top_k <= pool_size, f"top_k: expected 1 <= top_k <= M = {pool_size}, got {top_k}")
    else:
        _require(prompt_mask.dim() == 2 and prompt_mask.shape[0] == batch and prompt_mask.shape[1] >= 1,
                 f"prompt_mask: expected shape (B = {batch}, K >= 1), got {tuple(prompt_mask.shape)}")
        _require(not prompt_mask.is_floating_point() and prompt_mask.dtype != torch.bool,
                 f"prompt_mask: expected integer ids, got dtype {prompt_mask.dtype}")
    for name, t in (("x_embed", x_embed), ("prompt", prompt), ("keys", keys), ("cls_features", cls_features)):
        if t is not None:
            _require(t.is_floating_point(), f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    for name, t in (("prompt", prompt), ("keys", keys), ("cls_features", cls_features), ("prompt_mask", prompt_mask)):
        if t is not None:
            _require(t.device == x_embed.device, f"{name}: expected device {x_embed.device}, got {t.device}")


def launch_pool_forward(
    x_embed: Tensor,
    prompt: Tensor,
    keys: Tensor,
    cls_features: Tensor | None,
    prompt_mask: Tensor | None,
    query_mode: int,
    top_k: int,
    batchwise: bool,
) -> tuple[Tensor, ...]:
    """Select + gather + prepend. x_embed (B, N, D), prompt (M, Lp, D), keys (M, D), cls_features (B, D)
    (used when query_mode is 3), prompt_mask (B, K') or None.

    Returns (prompt_norm (M, D), x_embed_norm (B, D), similarity (B, M), selected_key (B, K, D),
    reduce_sim (), prompted_embedding (B, K·Lp + N, D), idx (B, K) int64, key_sumsq (M,),
    query_sumsq (B,), argmax (B, D) int32 for the max queries, else (0,)).
    """
    check_pool_args(x_embed, prompt, keys, cls_features, prompt_mask, query_mode, top_k)
    fwd, _, _ = _kernels()
    batch, tokens, width = x_embed.shape
    pool_size, length, _ = prompt.shape
    k = prompt_mask.shape[1] if prompt_mask is not None else top_k
    ct = compute_dtype(x_embed.dtype, keys.dtype)
    prompt = prompt.contiguous()
    new = functools.partial(torch.empty, device=x_embed.device)
    idx = new((batch, k), dtype=torch.int64)
    prompt_norm = new((pool_size, width), dtype=ct)
    x_norm = new((batch, width), dtype=ct)
    similarity = new((batch, pool_size), dtype=ct)
    selected = new((batch, k, width), dtype=ct)
    pull = new((batch,), dtype=ct)
    out = new((batch, k * length + tokens, width), dtype=torch.promote_types(prompt.dtype, x_embed.dtype))
    key_sumsq = new((pool_size,), dtype=ct)
    query_sumsq = new((batch,), dtype=ct)
    argmax = new((batch, width) if query_mode in (1, 2) else (0,), dtype=torch.int32)
    vote = batchwise and prompt_mask is None
    top = new((batch, k), dtype=torch.int64) if vote else idx
    cls = cls_features if query_mode == QUERY_FROM_CLS else x_embed[:, 0]
    mask = prompt_mask if prompt_mask is not None else idx
    blocks = _forward_blocks(tokens, width, pool_size, k, length * width)
    with _device_guard(x_embed):
        fwd.select_kernel[(batch,)](
            x_embed, *x_embed.stride(), cls, *cls.stride(), prompt, keys, *keys.stride(), mask, *mask.stride(),
            top, prompt_norm, x_norm, similarity, selected, pull, out, key_sumsq, query_sumsq, argmax,
            tokens, width, pool_size, k, length,
            QUERY=query_mode, HAS_MASK=prompt_mask is not None, GATHER=not vote, **blocks,
        )
        if vote:
            counts = new((batch, pool_size), dtype=torch.int32)
            fwd.vote_gather_kernel[(batch,)](
                top, counts, idx, prompt, keys, *keys.stride(), x_norm, selected, pull, out,
                batch, tokens, width, pool_size, k, length,
                BLOCK_M=blocks["BLOCK_M"], BLOCK_R=_pow2(batch * k, high=1024 if _big_blocks() else 64),
                BLOCK_D=blocks["BLOCK_D"], BLOCK_S=blocks["BLOCK_S"], BLOCK_E=blocks["BLOCK_E"],
            )
    reduce_sim = pull.sum() / batch
    return prompt_norm, x_norm, similarity, selected, reduce_sim, out, idx, key_sumsq, query_sumsq, argmax


def launch_prepend(prompt: Tensor, x_embed: Tensor) -> Tensor:
    """Non-pool mode: cat(prompt (Lp, D) for every row, x_embed (B, N, D)) → (B, Lp + N, D)."""
    _require(x_embed.dim() == 3, f"x_embed: expected (B, N, D), got shape {tuple(x_embed.shape)}")
    _require(prompt.dim() == 2 and prompt.shape[1] == x_embed.shape[2],
             f"prompt: expected (Lp, D) with D = {x_embed.shape[2]}, got shape {tuple(prompt.shape)}")
    _require(prompt.device == x_embed.device, f"prompt: expected device {x_embed.device}, got {prompt.device}")
    _, _, tuned = _kernels()
    batch, tokens, width = x_embed.shape
    length = prompt.shape[0]
    prompt = prompt.contiguous()
    out = torch.empty(
        (batch, length + tokens, width), device=x_embed.device, dtype=torch.promote_types(prompt.dtype, x_embed.dtype)
    )
    kernel = tuned.prepend_kernel
    meta = {} if tuned.AUTOTUNED else {"BLOCK_T": _pow2(length + tokens, high=64),
                                       "BLOCK_D": _pow2(width, high=1024 if _big_blocks() else 64)}

    def grid(m: dict) -> tuple[int, int, int]:
        return (batch, -(-(length + tokens) // m["BLOCK_T"]), -(-width // m["BLOCK_D"]))

    with _device_guard(x_embed):
        kernel[grid](prompt, x_embed, *x_embed.stride(), out, tokens, width, length, **meta)
    return out


def launch_grad_prompt(grad_out: Tensor, idx: Tensor, pool_size: int, length: int, dtype: torch.dtype) -> Tensor:
    """grad prompt (M, Lp, D) in ``dtype``: Σ of grad_out (B, K·Lp + N, D) rows over every slot holding id m."""
    _, bwd, _ = _kernels()
    grad_out = grad_out.contiguous()
    batch, total, width = grad_out.shape
    k = idx.shape[1]
    lpd = length * width
    grad_prompt = torch.empty((pool_size, length, width), device=grad_out.device, dtype=dtype)
    if _big_blocks():
        block_e = _pow2(lpd, high=1 << 14)
        block_r = _pow2(batch * k, high=max(16, (1 << 16) // block_e))
        block_p = _pow2(pool_size, low=1, high=max(1, (1 << 20) // (block_r * block_e)))
    else:
        block_p, block_r, block_e = 1, 16, _pow2(lpd, high=512)
    with _device_guard(grad_out):
        bwd.grad_prompt_kernel[(-(-pool_size // block_p), -(-lpd // block_e))](
            grad_out, idx.contiguous(), grad_prompt, pool_size, batch * k, k, total * width, lpd,
            ACC64=grad_out.dtype == torch.float64, BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_E=block_e,
        )
    return grad_prompt


def launch_grad_similarity(
    grad_prompt_norm: Tensor | None,
    grad_x_norm: Tensor | None,
    grad_similarity: Tensor | None,
    grad_selected: Tensor | None,
    grad_reduce_sim: Tensor | None,
    idx: Tensor,
    prompt_norm: Tensor,
    x_norm: Tensor,
    key_sumsq: Tensor,
    query_sumsq: Tensor,
    keys_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Grads of the keys (M, D) in ``keys_dtype`` and of the raw query (B, D) in the compute dtype.

    From the grads of prompt_norm (M, D), x_embed_norm (B, D), similarity (B, M), selected_key
    (B, K, D) and reduce_sim () (each may be None), through the pull term and the normalisation.
    """
    _, bwd, _ = _kernels()
    batch, width = x_norm.shape
    pool_size = prompt_norm.shape[0]
    k = idx.shape[1]
    ct = x_norm.dtype
    idx = idx.contiguous()
    new = functools.partial(torch.empty, device=x_norm.device, dtype=ct)
    grads = [None if g is None else g.to(ct).contiguous() for g in (grad_prompt_norm, grad_x_norm, grad_similarity,
                                                                    grad_selected, grad_reduce_sim)]
    g_pn, g_xn, g_sim, g_sel, g_rs = grads
    weight = new((batch, pool_size))
    grad_query = new((batch, width))
    scratch = new((pool_size, width))
    grad_keys = torch.empty((pool_size, width), device=x_norm.device, dtype=keys_dtype)
    use_dot = ct == torch.float32
    if _big_blocks():
        bb, bm, br = _pow2(batch, high=256), _pow2(pool_size, high=256), _pow2(batch * k, high=256)
        bd = _pow2(width, high=1024 if use_dot else 32)
    else:
        bb, bm, br, bd = 16, 16 if pool_size <= 16 else 32, 16, 64 if use_dot else 16
    with _device_guard(x_norm):
        bwd.pull_weight_kernel[(batch,)](
            g_sim if g_sim is not None else weight, g_rs if g_rs is not None else weight, idx, weight,
            batch, pool_size, k, HAS_GSIM=g_sim is not None, HAS_GRS=g_rs is not None,
            BLOCK_M=_pow2(pool_size, high=1024 if _big_blocks() else 128),
            BLOCK_K=_pow2(k, high=64 if _big_blocks() else 16),
        )
        bwd.grad_query_kernel[(-(-batch // bb),)](
            g_xn if g_xn is not None else grad_query, weight, prompt_norm, x_norm, query_sumsq, grad_query,
            batch, pool_size, width, HAS_GXN=g_xn is not None, USE_DOT=use_dot, BLOCK_B=bb, BLOCK_M=bm, BLOCK_D=bd,
        )
        bwd.grad_keys_kernel[(-(-pool_size // bm),)](
            g_pn if g_pn is not None else scratch, weight, x_norm, idx, g_sel if g_sel is not None else scratch,
            prompt_norm, key_sumsq, scratch, grad_keys, batch, pool_size, k, width,
            HAS_GPN=g_pn is not None, HAS_GSEL=g_sel is not None, USE_DOT=use_dot,
            BLOCK_M=bm, BLOCK_B=bb, BLOCK_R=br, BLOCK_D=bd,
        )
    return grad_keys, grad_query


def launch_grad_x(
    grad_out: Tensor | None, grad_query: Tensor, argmax: Tensor, query_mode: int, tokens: int, prompt_tokens: int,
    dtype: torch.dtype,
) -> Tensor:
    """grad x_embed (B, N, D) in ``dtype``: token slice of grad_out (B, K·Lp + N, D) + the query grad (B, D)
    spread by the token mean (query_mode 0, 2) and routed to the first argmax (B, D) (query_mode 1, 2)."""
    _, _, tuned = _kernels()
    batch, width = grad_query.shape
    grad_x = torch.empty((batch, tokens, width), device=grad_query.device, dtype=dtype)
    g = grad_out.contiguous() if grad_out is not None else grad_query
    total = prompt_tokens + tokens
    meta = {} if tuned.AUTOTUNED else {"BLOCK_N": _pow2(tokens, high=256 if _big_blocks() else 16),
                                       "BLOCK_D": _pow2(width, high=1024 if _big_blocks() else 64)}

    def grid(m: dict) -> tuple[int, int]:
        return (batch, -(-width // m["BLOCK_D"]))

    with _device_guard(grad_query):
        tuned.grad_x_kernel[grid](
            g, grad_query, argmax, grad_x, tokens, width, total, prompt_tokens,
            QUERY=query_mode, HAS_G=grad_out is not None, **meta,
        )
    return grad_x


def pool_forward(
    x_embed: Tensor,
    prompt: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    batchwise: bool,
    cls_features: Tensor | None = None,
    prompt_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Pool-mode forward by the Triton ops: every tensor output of SPEC §4.5 (see ``reference.pool_forward``)."""
    if embedding_key == "cls" and cls_features is not None:
        mode = QUERY_FROM_CLS
    else:
        mode, cls_features = QUERY_MODES[embedding_key], None
    prompt_norm, x_norm, similarity, selected, reduce_sim, out, idx = ops.triton_pool_forward(
        x_embed, prompt, keys, cls_features, prompt_mask, mode, top_k, batchwise
    )[:7]
    return ops.pool_outputs(idx, prompt_norm, x_norm, similarity, selected, reduce_sim, out)


def prepend(prompt: Tensor, x_embed: Tensor) -> Tensor:
    """Non-pool mode: the prompt (Lp, D) before every row of x_embed (B, N, D) → (B, Lp + N, D)."""
    return ops.triton_prepend(prompt, x_embed)
