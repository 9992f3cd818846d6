"""``DualPromptTextEncoder``: DualPrompt (Wang et al., ECCV 2022) on a frozen Hugging Face ``BertModel``.

The same prompts as ``DualPromptViT`` (``l2p_fast.dualprompt.layers``): a G-prompt in the first layers
(default 0, 1, length 5) and the E-prompt pool ``FusedEPrompt`` (default layers 2, 3, 4, length 5, M = 10,
top-1) selected by the frozen encoder's query, as ``L2PTextEncoder``'s: the prompt-free mean-pooled
sentence embedding (``query``, ``encode_queries``: the trainer caches it per example).

- Prefix-tuning (default): a layer's prompt (1 | B, 2, P, H, Dh) is put in front of its attention keys and
  values by ``l2p_fast.dualprompt.prefix_attention`` (no concat), padded tokens masked out; the token count
  and the positions do not change.
- Prompt-tuning: a layer's prompt (1 | B, P, D) is prepended to its input, so the sequence grows by P there
  (the prompts count as valid tokens); CLS then sits at ``total_prompt_len``. Unlike the port's ViT (which
  ignores a G-prompt without prefix-tuning), the G-prompt is used in this mode too.

The BERT layers run in padded form through the model's own modules (``query``, ``key``, ``value``,
``attention.output``, ``intermediate``, ``output``), backbone in eval mode. Heads: 'token' (CLS) or 'gap'
(mean of the valid rows, prompts included). Trainable: ``g_prompt``, ``e_prompt.*``, ``head``.
Shapes: B batch, T tokens, D width, H heads, Dh = D / H, M pool, K top-k, Lp E-prompt length, Lg G-prompt
length, L E layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..dualprompt.attention import prefix_attention
from ..dualprompt.eprompt import FusedEPrompt
from ..dualprompt.layers import check_layers, layer_prompt, make_g_prompt
from .bert_packed import packed_unsupported
from .common import check_final_tokens, freeze_all_but, pool_tokens, task_prompt_mask
from .dualprompt_vit import HEAD_TYPES, TRAINABLE
from .text import L2PTextEncoder, _load_backbone


def bert_prefix_layer(
    layer: nn.Module, h: Tensor, key_mask: Tensor | None, prefix: Tensor | None, rows: slice | None = None
) -> Tensor:
    """One HF ``BertLayer`` on h (B, S, D) whose attention also attends ``prefix`` (1 | B, 2, P, H, Dh) or None;
    ``key_mask`` (B, S) bool (False: padding) or None → (B, S, D). ``rows``: compute only those output rows
    (B, R, D) — queries, attention output and feed-forward on them, keys and values from every row."""
    attention = layer.attention.self
    heads, head_dim = attention.num_attention_heads, attention.attention_head_size

    def split(t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

    query_rows = h if rows is None else h[:, rows]
    q, k, v = split(attention.query(query_rows)), split(attention.key(h)), split(attention.value(h))
    prefix_k = prefix_v = None
    if prefix is not None:
        prefix_k, prefix_v = prefix.permute(1, 0, 3, 2, 4)  # (2, 1 | B, H, P, Dh), views
    context = prefix_attention(q, k, v, prefix_k, prefix_v, attention.scaling, key_mask=key_mask)
    out = layer.attention.output(context.transpose(1, 2).reshape(*query_rows.shape[:2], heads * head_dim), query_rows)
    return layer.output(layer.intermediate(out), out)


class DualPromptTextEncoder(nn.Module):
    """DualPrompt on a frozen BERT-style encoder (default: offline all-MiniLM-L6-v2, D = 384, 6 layers).

    The backbone must be a plain transformers ``BertModel`` (``bert_packed.packed_unsupported`` says why not).
    ``tokenize``, ``query`` and ``encode_queries`` are ``L2PTextEncoder``'s; ``forward`` returns the
    ``DualPromptViT`` dict (E-prompt outputs, ``x``, ``pre_logits``, ``logits``). ``final_tokens``: 'all' computes
    every row of the last layer; 'head' with the 'token' head only the CLS row (same logits and gradients up to
    float rounding; ``x`` is then (B, 1, D)). ``vote_group`` (None, "world" or a ProcessGroup): the E-prompt's batch
    vote over the processes (docs/behaviour.md §9).
    """

    tokenize = L2PTextEncoder.tokenize
    query = L2PTextEncoder.query
    encode_queries = L2PTextEncoder.encode_queries
    _check_ids = L2PTextEncoder._check_ids

    def __init__(
        self,
        backbone: object = None,
        *,
        num_classes: int,
        length: int = 5,
        pool_size: int = 10,
        top_k: int = 1,
        embedding_key: str = "cls",
        batchwise_prompt: bool = True,
        prompt_init: str = "uniform",
        prompt_key_init: str = "uniform",
        head_type: str = "token",
        use_prompt_mask: bool = True,
        g_prompt_length: int = 5,
        g_prompt_layer_idx: Sequence[int] = (0, 1),
        use_prefix_tune_for_g_prompt: bool = True,
        e_prompt_layer_idx: Sequence[int] = (2, 3, 4),
        use_prefix_tune_for_e_prompt: bool = True,
        layout: str = "permute",
        max_length: int = 64,
        backend: str = "auto",
        tokenizer: object = None,
        packed: bool = True,
        final_tokens: str = "all",
        vote_group: object = None,
    ) -> None:
        super().__init__()
        check_final_tokens(final_tokens)
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type: expected one of {HEAD_TYPES}, got {head_type!r}")
        positive = {"num_classes": num_classes, "max_length": max_length, "g_prompt_length": g_prompt_length}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(packed, bool):
            raise ValueError(f"packed: expected a bool, got {packed!r}")
        self.backbone, own_tokenizer = _load_backbone(backbone)
        self.backbone.eval()
        reason = packed_unsupported(self.backbone)
        if reason is not None:
            raise ValueError(f"backbone: expected a plain transformers BertModel, got one that is not ({reason})")
        self.tokenizer = tokenizer if tokenizer is not None else own_tokenizer
        config = self.backbone.config
        width, heads = config.hidden_size, config.num_attention_heads
        g_idx, e_idx = check_layers(g_prompt_layer_idx, e_prompt_layer_idx, config.num_hidden_layers)
        self.g_prompt = make_g_prompt(len(g_idx), g_prompt_length, width, heads, use_prefix_tune_for_g_prompt,
                                      prompt_init)
        self.e_prompt = FusedEPrompt(
            length=length, embed_dim=width, embedding_key=embedding_key, prompt_init=prompt_init, prompt_pool=True,
            prompt_key=True, pool_size=pool_size, top_k=top_k, batchwise_prompt=batchwise_prompt,
            prompt_key_init=prompt_key_init, num_layers=len(e_idx),
            use_prefix_tune_for_e_prompt=use_prefix_tune_for_e_prompt, num_heads=heads, layout=layout, backend=backend,
            vote_group=vote_group,  # global batch vote (docs/behaviour.md §9); settable: self.e_prompt.vote_group
        )  # fmt: skip
        self.head = nn.Linear(width, num_classes)
        self.to(self.backbone.get_input_embeddings().weight.device)
        self.g_prompt_layer_idx, self.e_prompt_layer_idx = g_idx, e_idx
        self.use_prefix_tune_for_g_prompt = use_prefix_tune_for_g_prompt
        self.use_prefix_tune_for_e_prompt = use_prefix_tune_for_e_prompt
        g_tokens = 0 if use_prefix_tune_for_g_prompt else g_prompt_length * len(g_idx)
        self.total_prompt_len = g_tokens + (0 if use_prefix_tune_for_e_prompt else top_k * length * len(e_idx))
        self.embed_dim = width
        self.num_classes = num_classes
        self.head_type = head_type
        self.use_prompt_mask = use_prompt_mask
        self.max_length = max_length
        self.backend = backend
        self.final_tokens = final_tokens
        self.packed = packed  # the query pass (L2PTextEncoder.query) runs padding-free when it can
        freeze_all_but(self, TRAINABLE)

    def train(self, mode: bool = True) -> DualPromptTextEncoder:
        """Set train/eval mode of prompts and head; the frozen backbone stays in eval mode (no dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters DualPrompt trains: G-prompt, E-prompts and keys, head."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        task_id: int = -1,
        cls_features: Tensor | None = None,
        train: bool = False,
        token_type_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """input_ids, attention_mask (B, T) → E-prompt outputs (``prompt_idx`` (B, K), ``reduce_sim``, …,
        ``batched_prompt``), ``x`` (B, total_prompt_len + T, D) (final_tokens 'head', 'token' head: (B, 1, D)),
        ``pre_logits`` (B, D), ``logits`` (B, C).

        ``cls_features`` (B, D): cached queries; None computes them (a second, no-grad pass). With
        ``use_prompt_mask`` and ``train``, task t uses E-prompt ids t·K … t·K+K−1 (none when that range
        exceeds M or t < 0)."""
        attention_mask = self._check_ids(input_ids, attention_mask)
        if cls_features is None:
            cls_features = self.query(input_ids, attention_mask)
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=positions)
        e_prompt = self.e_prompt
        mask = None
        if self.use_prompt_mask and train:
            mask = task_prompt_mask(task_id, e_prompt.top_k, e_prompt.pool_size, batch, h.device)
        # with a 'cls' query the pool never reads the tokens: hand it one
        pool_input = h[:, :1] if e_prompt.embedding_key == "cls" or seq == 1 else h[:, 1:]
        with torch.autocast(h.device.type, enabled=False):  # similarities stay in fp32
            res = e_prompt(pool_input, prompt_mask=mask, cls_features=cls_features)
        valid = attention_mask.bool()
        key_mask = None if bool(valid.all()) else valid
        g_prompt = self.g_prompt
        layers = self.backbone.encoder.layer
        head_only = self.final_tokens == "head" and self.head_type == "token"
        cls_row = slice(self.total_prompt_len, self.total_prompt_len + 1) if head_only else None
        for i, layer in enumerate(layers):
            prompt = layer_prompt(i, self.g_prompt_layer_idx, self.e_prompt_layer_idx, g_prompt,
                                  res["batched_prompt"], self.use_prefix_tune_for_g_prompt,
                                  self.use_prefix_tune_for_e_prompt)  # fmt: skip
            if prompt is not None and not prompt[0]:  # prompt-tuning: prepend, as valid tokens
                tokens = prompt[1].expand(batch, -1, -1).to(h.dtype)
                h = torch.cat([tokens, h], dim=1)
                valid = torch.cat([valid.new_ones(batch, tokens.shape[1]), valid], dim=1)
                key_mask = None if key_mask is None else valid
            rows = cls_row if i == len(layers) - 1 else None  # the last layer: only the CLS row with 'head'
            h = bert_prefix_layer(layer, h, key_mask, prompt[1] if prompt is not None and prompt[0] else None, rows)
        res["x"] = h
        if self.head_type == "token":
            pre_logits = h[:, 0 if head_only else self.total_prompt_len]
        else:
            pre_logits = pool_tokens(h, "gap", 0, valid)
        res["pre_logits"] = pre_logits
        res["logits"] = self.head(pre_logits)
        return res

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, head_type={self.head_type!r}, max_length={self.max_length}, "
            f"g_layers={list(self.g_prompt_layer_idx)}, e_layers={list(self.e_prompt_layer_idx)}, "
            f"final_tokens={self.final_tokens!r}"
        )
