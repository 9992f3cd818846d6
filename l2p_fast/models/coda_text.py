"""``CodaTextEncoder``: CODA-Prompt on a frozen Hugging Face ``BertModel`` (default: offline all-MiniLM-L6-v2).

The query is the frozen encoder's prompt-free, mean-pooled sentence embedding (``L2PTextEncoder.query``: the
trainer's feature cache holds exactly it). In each prompted layer (default 0–4) the layer's mix (B, Lp, D) is split
into a key prefix (first Lp/2 tokens) and a value prefix, projected by nothing (as in the ViT: the prefixes are the
per-head keys and values themselves) and placed before the layer's own keys and values; the prefix is never masked,
pad tokens are. The encoder runs padded, layer by layer, through the model's own modules (``bert_prefix_forward``;
dropout off: the backbone stays in eval mode). The head reads the mean of the final valid tokens (the encoder's own
sentence pooling). Lp must be even (see ``coda_vit.py``).
Shapes: B batch, T tokens, D width, H heads, Dh = D / H, M pool, F used rows, Lp prompt length, L prompted layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..coda.module import DEFAULT_LAYERS, FusedCodaPrompt
from .bert_packed import packed_unsupported
from .common import freeze_all_but
from .text import L2PTextEncoder, _load_backbone, mean_pool

TRAINABLE = ("prompt.", "head.")


def _heads(t: Tensor, heads: int) -> Tensor:
    """(B, S, D) → (B, H, S, Dh)."""
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def bert_prefix_layer(layer: nn.Module, h: Tensor, valid: Tensor, prefix: Tensor | None) -> Tensor:
    """One ``BertLayer`` (eval mode) on h (B, T, D) with pad mask ``valid`` (B, T) bool; ``prefix`` (B, Lp, D): its
    first Lp/2 tokens are extra keys, the rest extra values of every head (never masked)."""
    attn = layer.attention.self
    heads = attn.num_attention_heads
    q, k, v = _heads(attn.query(h), heads), _heads(attn.key(h), heads), _heads(attn.value(h), heads)
    mask = valid[:, None, None, :]
    if prefix is not None:
        half = prefix.shape[1] // 2
        prefix = prefix.to(h.dtype)
        k = torch.cat([_heads(prefix[:, :half], heads), k], dim=2)
        v = torch.cat([_heads(prefix[:, half:], heads), v], dim=2)
        mask = torch.cat([mask.new_ones(mask.shape[0], 1, 1, half), mask], dim=-1)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(h.shape)
    out = layer.attention.output
    h = out.LayerNorm(out.dense(ctx) + h)
    return layer.output.LayerNorm(layer.output.dense(layer.intermediate.intermediate_act_fn(
        layer.intermediate.dense(h))) + h)


def bert_prefix_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prefixes: Mapping[int, Tensor],
                        token_type_ids: Tensor | None = None) -> Tensor:
    """Last hidden state (B, T, D) of a ``BertModel`` whose layers ``prefixes`` names attend their prefix (B, Lp, D)
    too; pad positions hold meaningless values (masked as keys, never read by ``mean_pool``)."""
    h = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    valid = attention_mask.bool()
    for i, layer in enumerate(model.encoder.layer):
        h = bert_prefix_layer(layer, h, valid, prefixes.get(i))
    return h


class CodaTextEncoder(nn.Module):
    """CODA-Prompt on a frozen BERT-style encoder (see the module docstring).

    Trainable: ``prompt.e_{p,k,a}_{l}`` and ``head``. ``set_task`` advances the slice, as ``CodaViT``'s.
    """

    def __init__(
        self, backbone: object = None, *, num_classes: int, n_tasks: int, pool_size: int = 100, length: int = 8,
        ortho_mu: float = 0.0, prompt_layer_idx: Sequence[int] = DEFAULT_LAYERS, max_length: int = 64,
        backend: str = "auto", tokenizer: object = None, generator: torch.Generator | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 2 or length % 2:
            raise ValueError(f"length: expected an even prompt length >= 2 (half key, half value prefix), got "
                             f"{length!r}")
        self.backbone, own_tokenizer = _load_backbone(backbone)
        reason = packed_unsupported(self.backbone)
        if reason is not None:
            raise ValueError(f"backbone: CODA's prefix layers need a plain transformers BertModel, got one with "
                             f"{reason}")
        self.tokenizer = tokenizer if tokenizer is not None else own_tokenizer
        depth = len(self.backbone.encoder.layer)
        layers = tuple(prompt_layer_idx)
        if not layers or any(not isinstance(i, int) or not 0 <= i < depth for i in layers) or len(set(layers)) != len(
                layers):
            raise ValueError(f"prompt_layer_idx: expected distinct layer indices in [0, {depth}), got {list(layers)}")
        width = self.backbone.get_input_embeddings().embedding_dim
        self.prompt = FusedCodaPrompt(width, n_tasks, [pool_size, length, ortho_mu], key_dim=width, layers=layers,
                                      backend=backend, generator=generator)
        self.head = nn.Linear(width, num_classes)
        self.embed_dim, self.num_classes, self.max_length = width, num_classes, max_length
        self.packed = True  # the query's prompt-free pass (L2PTextEncoder.query) runs padding-free
        self.backbone.eval()
        freeze_all_but(self, TRAINABLE)

    def train(self, mode: bool = True) -> CodaTextEncoder:
        """Set train/eval mode of prompts and head; the frozen backbone stays in eval mode (no dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    tokenize = L2PTextEncoder.tokenize
    _check_ids = L2PTextEncoder._check_ids
    query = L2PTextEncoder.query  # prompt-free mean-pooled sentence embedding (B, D), no grad

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

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, cls_features: Tensor | None = None,
        train: bool = False, token_type_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """Token ids (B, T) → ``logits``, ``pre_logits`` (B, D), ``ortho_loss`` () and ``component_weights``
        (L, B, F); ``cls_features`` (B, D): cached queries (None: computed by a no-grad pass)."""
        attention_mask = self._check_ids(input_ids, attention_mask)
        query = self.query(input_ids, attention_mask) if cls_features is None else cls_features
        prefixes, weights = {}, []
        loss = self.head.weight.new_zeros(())
        for layer in self.prompt.e_layers:
            mixed, alpha, layer_loss = self.prompt.mix(query, layer, train)
            prefixes[layer] = mixed
            weights.append(alpha)
            loss = loss + layer_loss
        hidden = bert_prefix_forward(self.backbone, input_ids, attention_mask, prefixes, token_type_ids)
        pre_logits = mean_pool(hidden, attention_mask)
        return {"logits": self.head(pre_logits), "pre_logits": pre_logits, "ortho_loss": loss,
                "component_weights": torch.stack(weights)}
