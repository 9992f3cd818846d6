"""``CodaViT``: CODA-Prompt (Smith et al., CVPR 2023) on any timm ``VisionTransformer`` (the original's ``ViTZoo``).

The frozen ViT's modules are adopted (not copied). The query is the prompt-free pass's final-LayerNorm CLS
(B, D), no grad (``cls_features`` when given). In each prompted block (default 0–4) the layer's mix
(``FusedCodaPrompt.mix``: (B, Lp, D), the fused op) is read as the prefix (B, 2, Lp/2, H, Dh) (first half keys,
second half values: a view, no copy) of ``l2p_fast.dualprompt.prefix_attention``; other blocks are timm's. The head
reads the final CLS. Lp must be even: the original gives odd Lp a key prefix one token shorter than its value
prefix, which no attention can use (its ViT then fails), so the constructor refuses it with a ``ValueError``.

Trainable: ``prompt.e_{p,k,a}_{l}`` and ``head``. Rows of earlier tasks are frozen inside the op (training uses
rows [0, f), gradient only to [s, f)); ``set_task`` advances the slice (Gram–Schmidt init of the new rows).
Shapes: B batch, N tokens, D width, H heads, Dh = D / H, M pool, F used rows, Lp prompt length, L prompted layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..coda.module import DEFAULT_LAYERS, FusedCodaPrompt
from .common import check_final_tokens, freeze_all_but
from .dualprompt_vit import DualPromptViT, _check_block, prefix_block
from .vit import _check_vit
from .vit_rows import block_rows, is_rowwise_norm

TRAINABLE = ("prompt.", "head.")


class CodaViT(nn.Module):
    """CODA-Prompt on a frozen timm ``VisionTransformer`` (see the module docstring).

    ``final_tokens``: 'all' runs the last block on every token; 'head' (when the last block is not prompted) only
    on the CLS row the head reads (``l2p_fast.models.vit_rows.block_rows``; the same logits up to rounding).
    """

    def __init__(
        self, vit: nn.Module, *, n_tasks: int, pool_size: int = 100, length: int = 8, ortho_mu: float = 0.0,
        prompt_layer_idx: Sequence[int] = DEFAULT_LAYERS, backend: str = "auto", final_tokens: str = "all",
        generator: torch.Generator | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        _check_vit(vit)
        check_final_tokens(final_tokens)
        if isinstance(length, bool) or not isinstance(length, int) or length < 2 or length % 2:
            raise ValueError(f"length: expected an even prompt length >= 2 (half key, half value prefix), got "
                             f"{length!r}")
        depth = len(vit.blocks)
        layers = tuple(prompt_layer_idx)
        if not layers or any(not isinstance(i, int) or not 0 <= i < depth for i in layers) or len(set(layers)) != len(
                layers):
            raise ValueError(f"prompt_layer_idx: expected distinct block indices in [0, {depth}), got {list(layers)}")
        for i in layers:
            _check_block(vit.blocks[i], i)
        width = vit.cls_token.shape[-1]
        for name in ("cls_token", "pos_embed", "patch_embed", "pos_drop", "norm_pre", "blocks", "norm", "fc_norm",
                     "head_drop", "head"):
            setattr(self, name, getattr(vit, name))
        self.prompt = FusedCodaPrompt(width, n_tasks, [pool_size, length, ortho_mu], key_dim=width, layers=layers,
                                      backend=backend, generator=generator).to(vit.cls_token.device)
        self.heads = vit.blocks[layers[0]].attn.num_heads
        self.final_tokens = final_tokens
        self.num_classes = getattr(vit, "num_classes", None)
        freeze_all_but(self, TRAINABLE)

    from_timm = DualPromptViT.__dict__["from_timm"]  # the same construction from a timm instance or model name
    embed = DualPromptViT.embed  # images (B, C, H, W) → [CLS, patches] + positions (B, 1 + N, D)
    query = DualPromptViT.query  # the prompt-free final-LayerNorm CLS (B, D), no grad, eval mode

    @property
    def task_count(self) -> int:
        """The current task (its slice trains; evaluation uses the rows of every task up to it)."""
        return self.prompt.task_count

    def set_task(self, task: int, generator: torch.Generator | None = None) -> None:
        """Advance to ``task`` (``FusedCodaPrompt.set_task``)."""
        self.prompt.set_task(task, generator)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters CODA-Prompt trains: every layer's components, keys, attention vectors, and the head."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x: Tensor, cls_features: Tensor | None = None, train: bool = False) -> dict[str, Tensor]:
        """Images (B, C, H, W) → ``logits`` (B, classes), ``pre_logits`` (B, D), ``ortho_loss`` () (summed over the
        prompted layers), ``component_weights`` (L, B, F) (α of each prompted layer)."""
        query = self.query(x) if cls_features is None else cls_features
        tokens = self.embed(x)
        batch, width = tokens.shape[0], tokens.shape[-1]
        prompt = self.prompt
        loss = tokens.new_zeros(())
        weights = []
        last = len(self.blocks) - 1
        head_only = self.final_tokens == "head"
        for i, block in enumerate(self.blocks):
            if i in prompt.e_layers:
                mixed, alpha, layer_loss = prompt.mix(query, i, train)
                prefix = mixed.view(batch, 2, mixed.shape[1] // 2, self.heads, width // self.heads)
                tokens = prefix_block(block, tokens, prefix.to(tokens.dtype))
                loss = loss + layer_loss
                weights.append(alpha)
            elif i == last and head_only and is_rowwise_norm(self.norm):
                tokens = block_rows(block, tokens, 0, 1)
            else:
                tokens = block(tokens)
        pre_logits = self.norm(tokens)[:, 0]
        logits = self.head(self.head_drop(self.fc_norm(pre_logits)))
        return {"logits": logits, "pre_logits": pre_logits, "ortho_loss": loss,
                "component_weights": torch.stack(weights)}
