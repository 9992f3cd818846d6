"""A contiguous slice of a transformer block's output rows, without computing the other rows.

``block_rows(block, x, start, stop)`` equals ``block(x)[:, start:stop]`` up to float rounding. For
exactly timm's ``Block`` with exactly timm's ``Attention``, keys and values come from all N rows, while
the query projection, attention output, ``proj``, residual, ``norm2`` and MLP run only on rows
``start:stop`` (the block's own modules and weights; the fused qkv weight is sliced, not copied).
Anything it cannot show to be row-wise (other block, attention or MLP classes, unknown norms, hooks,
non-zero dropout or drop-path in training mode) runs the full block and slices: correctness first.
Shapes: B batch, N tokens, D width, R = stop − start rows, H heads, hd head width, A = H·hd.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import walk_modules

_TORCH_NORMS = (nn.Identity, nn.LayerNorm, nn.RMSNorm)


@functools.cache
def _timm() -> SimpleNamespace | None:
    """timm's classes the row path knows (None without timm: every block then runs in full)."""
    try:
        import timm.layers as layers
        from timm.models.vision_transformer import Attention, Block
    except ImportError:
        return None

    def known(*names: str) -> tuple[type, ...]:  # the ones this timm version has
        return tuple(getattr(layers, name) for name in names if isinstance(getattr(layers, name, None), type))

    return SimpleNamespace(
        block=Block,
        attention=Attention,
        mlps=known("Mlp", "GluMlp", "SwiGLU"),
        norms=_TORCH_NORMS + known("LayerNorm", "RmsNorm", "SimpleNorm"),
        scales=(nn.Identity, *known("LayerScale")),
        drop_paths=(nn.Identity, *known("DropPath")),
    )


def is_rowwise_norm(module: nn.Module) -> bool:
    """True when ``module`` is exactly one of the known last-dim norms (or Identity), so it acts per row."""
    timm = _timm()
    return type(module) in (timm.norms if timm is not None else _TORCH_NORMS)


def _is_stochastic(m: nn.Module) -> bool:
    if not m.training:
        return False
    attrs = m.__dict__  # plain attributes: no nn.Module.__getattr__ fallback on a miss
    return bool(attrs.get("p", 0.0) if isinstance(m, nn.modules.dropout._DropoutNd) else attrs.get("drop_prob", 0.0))


def is_stochastic(module: nn.Module) -> bool:
    """True when a submodule in training mode has a non-zero dropout or drop-path rate."""
    return any(_is_stochastic(m) for m in walk_modules(module))


def supports_rows(block: nn.Module) -> bool:
    """True when ``block_rows`` may compute ``block``'s rows on their own (else it runs the full block).

    Runs on every forward, so it walks the block's modules once (no hooks, no convolution, nothing
    stochastic) after the type checks.
    """
    timm = _timm()
    if timm is None or type(block) is not timm.block or type(getattr(block, "attn", None)) is not timm.attention:
        return False
    attn, mlp = block.attn, block.mlp
    gate = getattr(attn, "gate", None)
    if type(attn.qkv) is not nn.Linear or type(attn.proj) is not nn.Linear:
        return False
    if gate is not None and type(gate) is not nn.Linear:
        return False
    if type(mlp) not in timm.mlps:
        return False
    norms = (block.norm2, attn.q_norm, attn.k_norm, attn.norm, getattr(mlp, "norm", None))
    if not all(m is None or is_rowwise_norm(m) for m in norms):
        return False
    if type(block.ls1) not in timm.scales or type(block.ls2) not in timm.scales:
        return False
    if type(block.drop_path1) not in timm.drop_paths or type(block.drop_path2) not in timm.drop_paths:
        return False
    if attn.training and attn.attn_drop.p > 0:
        return False
    for m in walk_modules(block):
        if m._forward_hooks or m._forward_pre_hooks or isinstance(m, nn.modules.conv._ConvNd) or _is_stochastic(m):
            return False
    return True


def _attention_rows(attn: nn.Module, h: Tensor, start: int, stop: int) -> Tensor:
    """timm ``Attention`` output rows (B, R, D) for normed input h (B, N, D): q from the rows, k/v from all."""
    b, n, _ = h.shape
    r = stop - start
    heads, head_dim = attn.num_heads, attn.head_dim
    width = getattr(attn, "attn_dim", heads * head_dim)  # A; the qkv weight is (3A, D): [q; k; v]
    weight, bias = attn.qkv.weight, attn.qkv.bias
    rows = h[:, start:stop]
    q = F.linear(rows, weight[:width], None if bias is None else bias[:width])
    q = q.reshape(b, r, heads, head_dim).transpose(1, 2)  # (B, H, R, hd)
    kv = F.linear(h, weight[width:], None if bias is None else bias[width:])
    k, v = kv.reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:  # supports_rows guarantees no attention dropout here
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        out = attn.attn_drop(scores.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, r, width))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(rows).sigmoid()
    return attn.proj_drop(attn.proj(out))


def block_rows(block: nn.Module, x: Tensor, start: int, stop: int) -> Tensor:
    """``block(x)[:, start:stop]`` (B, R, D) for tokens x (B, N, D), computing only those rows where supported."""
    n = x.shape[1]
    if not 0 <= start < stop <= n:
        raise ValueError(f"start, stop: expected 0 <= start < stop <= {n}, got {start}, {stop}")
    if (start, stop) == (0, n):
        return block(x)
    if not supports_rows(block):
        return block(x)[:, start:stop]
    h = block.norm1(x)
    y = x[:, start:stop] + block.drop_path1(block.ls1(_attention_rows(block.attn, h, start, stop)))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def blocks_rows(blocks: nn.Module, x: Tensor, start: int, stop: int) -> Tensor:
    """``blocks(x)[:, start:stop]`` (B, R, D): every block of an ``nn.Sequential`` in full but the last."""
    if not isinstance(blocks, nn.Sequential) or blocks._forward_hooks or blocks._forward_pre_hooks:
        return blocks(x)[:, start:stop]
    if len(blocks) == 0:
        return x[:, start:stop]
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        x = block_rows(block, x, start, stop) if i == last else block(x)
    return x


# ------------------------------------------------------------------------------------------------
# The first block shared by the query pass and the prompted pass. Both passes feed the first block the
# same frozen rows (CLS and patches, with their positions); the prompted pass only adds the K·Lp prompt
# rows. Their normed inputs and qkv projections are computed once, in the no-grad query pass, and the
# prompted pass projects only its new rows (and its backward skips the frozen rows' projection).
# ------------------------------------------------------------------------------------------------
def supports_shared_rows(block: nn.Module) -> bool:
    """True when ``block``'s qkv of some rows may come from another pass (row-wise, no gate)."""
    return supports_rows(block) and getattr(block.attn, "gate", None) is None


def first_qkv(block: nn.Module, x: Tensor) -> Tensor:
    """The fused qkv projection (B, N, 3A) of the block's normed input x (B, N, D)."""
    return block.attn.qkv(block.norm1(x))


def _attend(attn: nn.Module, qkv: Tensor) -> Tensor:
    """timm ``Attention`` from its qkv (B, N, 3A) → output (B, N, D), as ``Attention.forward`` computes it."""
    b, n, _ = qkv.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n, getattr(attn, "attn_dim", heads * head_dim)))
    return attn.proj_drop(attn.proj(out))


def block_from_qkv(block: nn.Module, x: Tensor, qkv: Tensor) -> Tensor:
    """``block(x)`` (B, N, D) given the qkv projection (B, N, 3A) of its normed input (``first_qkv``)."""
    y = x + block.drop_path1(block.ls1(_attend(block.attn, qkv)))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def block_with_frozen_rows(block: nn.Module, x: Tensor, frozen_qkv: Tensor, start: int, stop: int) -> Tensor:
    """``block(x)`` (B, N, D) where only rows start:stop are new: the other rows' qkv is ``frozen_qkv``
    (B, N − (stop − start), 3A), the qkv of x without those rows (e.g. from the prompt-free pass)."""
    new = first_qkv(block, x[:, start:stop])
    qkv = torch.cat([frozen_qkv[:, :start], new, frozen_qkv[:, start:]], dim=1)
    return block_from_qkv(block, x, qkv)
