"""Which prompt each layer of a DualPrompt model gets: shared by ``DualPromptViT`` and ``DualPromptTextEncoder``.

G layers get the G-prompt (one per layer, shared by the batch), E layers the E-prompts the pool selected per
input. A layer's prompt is a **prefix** (1 | B, 2, P, H, Dh) (key half, value half) put in front of its
attention keys and values, or **tokens** (1 | B, P, D) prepended to its input (prompt-tuning).
Shapes: B batch, D width, H heads, Dh = D / H, P prompt length (Lg for G, K·Lp for E).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..pool import _init_parameter


def check_layers(g_layers: Sequence[int], e_layers: Sequence[int], depth: int) -> tuple[tuple[int, ...], ...]:
    """(g_layers, e_layers) as tuples after checking: distinct indices in [0, depth), disjoint, E not empty."""
    g_idx, e_idx = tuple(g_layers), tuple(e_layers)
    for name, idx in (("g_prompt_layer_idx", g_idx), ("e_prompt_layer_idx", e_idx)):
        bad = any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in idx)
        if bad or len(set(idx)) != len(idx):
            raise ValueError(f"{name}: expected distinct block indices in [0, {depth}), got {list(idx)}")
    if set(g_idx) & set(e_idx):
        raise ValueError(
            f"e_prompt_layer_idx: expected no layer of g_prompt_layer_idx {list(g_idx)}, got {list(e_idx)}"
        )
    if not e_idx:
        raise ValueError("e_prompt_layer_idx: expected at least one layer, got []")
    return g_idx, e_idx


def make_g_prompt(
    layers: int, length: int, width: int, heads: int, prefix: bool, init: str
) -> nn.Parameter | None:
    """The G-prompt parameter: (layers, 2, Lg, H, Dh) for prefix-tuning, else (layers, Lg, D); None without layers."""
    if not layers:
        return None
    shape = (layers, 2, length, heads, width // heads) if prefix else (layers, length, width)
    return _init_parameter(shape, init)


def layer_prompt(
    index: int,
    g_layers: tuple[int, ...],
    e_layers: tuple[int, ...],
    g_prompt: Tensor | None,
    e_prompts: Tensor,
    g_prefix: bool,
    e_prefix: bool,
) -> tuple[bool, Tensor] | None:
    """The prompt of layer ``index``: (is_prefix, prompt) or None. ``g_prompt`` as :func:`make_g_prompt` (None:
    G layers get nothing); ``e_prompts`` the pool's ``batched_prompt`` (L, B, 2, K·Lp, H, Dh) or (L, B, K·Lp, D).
    A G-prompt comes with batch 1 (broadcast by the caller), an E-prompt with batch B."""
    if g_prompt is not None and index in g_layers:
        return g_prefix, g_prompt[g_layers.index(index)].unsqueeze(0)
    if index in e_layers:
        return e_prefix, e_prompts[e_layers.index(index)]
    return None
