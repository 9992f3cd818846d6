"""``DualPromptViT``: DualPrompt (Wang et al., ECCV 2022) on any timm ``VisionTransformer`` (the port's layout).

The frozen ViT's modules are adopted (not copied). Tokens are timm's: ``[CLS, patches] + pos_embed``. The
E-prompt selection (``FusedEPrompt``, the L2P pool's fused selection) runs once on those tokens (query:
``cls_features``, or the token max when None with ``embedding_key='cls'``), then:

- G layers (default 0, 1), prefix-tuning: ``g_prompt[i]`` (2, Lg, H, Dh) is every sample's prefix (broadcast,
  never copied). With ``use_prefix_tune_for_g_prompt=False`` the G-prompt is unused, as in the port
  (its parameter (num_G, Lg, D) exists and gets no gradient).
- E layers (default 2, 3, 4), prefix-tuning: ``batched_prompt[j]`` (B, 2, K·Lp, H, Dh) is the prefix;
  prompt-tuning: ``batched_prompt[j]`` (B, K·Lp, D) is prepended to the tokens before the block (the
  sequence grows by K·Lp at each E layer; the head's CLS then sits at ``total_prompt_len``).
- Attention with a prefix is ``l2p_fast.dualprompt.prefix_attention`` (no concat of the layer's k/v).

State-dict keys are the port's: timm's names plus ``g_prompt``, ``e_prompt.prompt``, ``e_prompt.prompt_key``
(``load_port_state_dict`` also takes the port's ``{'model': …}`` checkpoint and DDP's ``module.`` prefix).
Trainable: ``g_prompt``, ``e_prompt.*`` and ``head``. Shapes: B batch, N tokens, D width, H heads, Dh = D / H,
M pool, K top-k, Lp E-prompt length, Lg G-prompt length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..dualprompt.attention import prefix_attention
from ..dualprompt.eprompt import FusedEPrompt
from ..dualprompt.layers import check_layers, layer_prompt, make_g_prompt
from .common import check_final_tokens, eval_mode, freeze_all_but, task_prompt_mask
from .vit import _check_vit
from .vit_rows import block_rows, is_rowwise_norm

TRAINABLE = ("g_prompt", "e_prompt.", "head.")
HEAD_TYPES = ("token", "gap")


def _check_block(block: nn.Module, index: int) -> None:
    """Raise unless ``block`` is timm's ``Block`` with timm's ``Attention`` without q/k norms or a gate."""
    from timm.models.vision_transformer import Attention, Block

    attn = getattr(block, "attn", None)
    if type(block) is not Block or type(attn) is not Attention:
        raise ValueError(f"model.blocks[{index}]: expected timm's Block with Attention, got {type(block).__name__}")
    extras = [name for name in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attn, name), nn.Identity)]
    if extras or getattr(attn, "gate", None) is not None:
        got = extras or "gate"
        raise ValueError(f"model.blocks[{index}]: prefix attention supports no q/k norm or gate, got {got}")


def prefix_block(block: nn.Module, x: Tensor, prefix: Tensor) -> Tensor:
    """timm ``Block`` on x (B, N, D) whose attention also attends the prefix (1 | B, 2, P, H, Dh) → (B, N, D)."""
    attn = block.attn
    batch, tokens, width = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, Dh)
    prefix = prefix.permute(1, 0, 3, 2, 4)  # (2, 1 | B, H, P, Dh), a view
    if attn.training and attn.attn_drop.p > 0:  # attention dropout: the port's concat path
        keys = torch.cat([prefix[0].expand(batch, -1, -1, -1), k], dim=2)
        values = torch.cat([prefix[1].expand(batch, -1, -1, -1), v], dim=2)
        out = attn.attn_drop((q @ keys.transpose(-2, -1) * attn.scale).softmax(dim=-1)) @ values
    else:
        out = prefix_attention(q, k, v, prefix[0], prefix[1], attn.scale)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(batch, tokens, -1)))
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class DualPromptViT(nn.Module):
    """DualPrompt on a frozen timm ``VisionTransformer``: G-prompts in the first layers, an E-prompt pool after.

    ``final_tokens``: 'all' (default, the port's ``x``) runs the last block on every token; 'head' only on the
    rows the head reads (the CLS row for ``head_type='token'``; every row for 'gap'), where the last block is a
    plain timm block (``l2p_fast.models.vit_rows.block_rows``; the same logits up to float rounding).
    ``vote_group`` (None, "world" or a ProcessGroup): the E-prompt's batch vote over the processes
    (docs/behaviour.md §9).
    """

    def __init__(
        self,
        vit: nn.Module,
        *,
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
        backend: str = "auto",
        final_tokens: str = "all",
        vote_group: object = None,
    ) -> None:
        super().__init__()
        _check_vit(vit)
        check_final_tokens(final_tokens)
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type: expected one of {HEAD_TYPES}, got {head_type!r}")
        g_idx, e_idx = check_layers(g_prompt_layer_idx, e_prompt_layer_idx, len(vit.blocks))
        width = vit.cls_token.shape[-1]
        heads = vit.blocks[0].attn.num_heads
        prefix_layers = g_idx if use_prefix_tune_for_g_prompt else ()
        prefix_layers += e_idx if use_prefix_tune_for_e_prompt else ()
        for i in prefix_layers:
            _check_block(vit.blocks[i], i)
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.patch_embed = vit.patch_embed
        self.pos_drop = vit.pos_drop
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.head = vit.head
        device = vit.cls_token.device
        self.g_prompt = make_g_prompt(len(g_idx), g_prompt_length, width, heads, use_prefix_tune_for_g_prompt,
                                      prompt_init)
        self.e_prompt = FusedEPrompt(
            length=length, embed_dim=width, embedding_key=embedding_key, prompt_init=prompt_init, prompt_pool=True,
            prompt_key=True, pool_size=pool_size, top_k=top_k, batchwise_prompt=batchwise_prompt,
            prompt_key_init=prompt_key_init, num_layers=len(e_idx),
            use_prefix_tune_for_e_prompt=use_prefix_tune_for_e_prompt, num_heads=heads, layout=layout, backend=backend,
            vote_group=vote_group,  # global batch vote (docs/behaviour.md §9); settable: self.e_prompt.vote_group
        )  # fmt: skip
        self.to(device)
        self.g_prompt_layer_idx, self.e_prompt_layer_idx = g_idx, e_idx
        self.use_prefix_tune_for_g_prompt = use_prefix_tune_for_g_prompt
        self.use_prefix_tune_for_e_prompt = use_prefix_tune_for_e_prompt
        self.use_prompt_mask = use_prompt_mask
        self.head_type = head_type
        self.final_tokens = final_tokens
        self.total_prompt_len = 0 if use_prefix_tune_for_e_prompt else top_k * length * len(e_idx)
        self.num_classes = getattr(vit, "num_classes", None)
        freeze_all_but(self, TRAINABLE)

    @classmethod
    def from_timm(cls, model_or_name: nn.Module | str, *, pretrained: bool = False, num_classes: int | None = None,
                  timm_kwargs: Mapping[str, object] | None = None, **options: object) -> DualPromptViT:
        """Build from a timm VisionTransformer instance or a model name (``timm.create_model(name, pretrained,
        num_classes, **timm_kwargs)``); ``options`` go to the constructor (the paper's defaults otherwise)."""
        if isinstance(model_or_name, str):
            import timm

            kwargs = dict(timm_kwargs or {})
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            vit = timm.create_model(model_or_name, pretrained=pretrained, **kwargs)
        elif isinstance(model_or_name, nn.Module):
            if pretrained or timm_kwargs:
                raise ValueError("pretrained, timm_kwargs: only apply to a model name, got an instance")
            vit = model_or_name
            if num_classes is not None and num_classes != getattr(vit, "num_classes", None):
                vit.reset_classifier(num_classes)
        else:
            raise TypeError(f"model_or_name: expected a timm model or a model name, got {type(model_or_name).__name__}")
        return cls(vit, **options)

    def _head_rows(self, seq_len: int) -> tuple[int, int]:
        """Rows ``start:stop`` of the final tokens (S = ``seq_len``) the head reads: CLS ('token') or all ('gap')."""
        if self.head_type == "token":
            return self.total_prompt_len, self.total_prompt_len + 1
        return 0, seq_len

    def load_port_state_dict(self, checkpoint: Mapping[str, object], strict: bool = True):
        """Load a DualPrompt-port checkpoint: its state dict, or the ``{'model': state_dict}`` its engine saves;
        a DDP ``module.`` prefix is dropped. Returns ``load_state_dict``'s result."""
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
        if not isinstance(state, Mapping):
            raise TypeError(f"checkpoint: expected a state dict or {{'model': state dict}}, got {type(state).__name__}")
        state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
        return self.load_state_dict(state, strict=strict)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters DualPrompt trains: G-prompt, E-prompts and keys, head."""
        return [p for p in self.parameters() if p.requires_grad]

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) → block input [CLS, patches] + positions (B, 1 + N, D), as timm."""
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a float image batch (B, C, H, W), got {shape}")
        patches = self.patch_embed(x)
        seq = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        return self.norm_pre(self.pos_drop(seq))

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """``cls_features`` (B, D): final-LayerNorm CLS of the prompt-free pass, no grad, eval mode (the port's
        frozen ``original_model``'s feature, computed by the same frozen modules)."""
        with eval_mode(self):
            return self.norm(self.blocks(self.embed(x)))[:, 0]

    def forward(
        self, x: Tensor, task_id: int = -1, cls_features: Tensor | None = None, train: bool = False,
        *, block_outputs: bool = False,
    ) -> dict[str, object]:  # fmt: skip
        """Images (B, C, H, W) → the port's dict: E-prompt outputs, ``x`` (final-normed tokens; with
        ``final_tokens='head'`` only the head's rows), ``pre_logits`` (B, D), ``logits``; with ``block_outputs``
        also each block's output. With ``use_prompt_mask`` and
        ``train``, task t uses E-prompt ids t·K … t·K+K−1 (dropped when that range exceeds M, or t < 0)."""
        tokens = self.embed(x)
        e_prompt = self.e_prompt
        mask = None
        if self.use_prompt_mask and train:
            mask = task_prompt_mask(task_id, e_prompt.top_k, e_prompt.pool_size, x.shape[0], x.device)
        with torch.autocast(tokens.device.type, enabled=False):  # similarities stay in fp32
            res = e_prompt(tokens, prompt_mask=mask, cls_features=cls_features)
        batched = res["batched_prompt"]
        outputs = []
        g_prompt = self.g_prompt if self.use_prefix_tune_for_g_prompt else None  # the port ignores G prompt-tuning
        last = len(self.blocks) - 1
        head_only = self.final_tokens == "head"
        sliced = False  # whether tokens holds only the rows the head reads
        for i, block in enumerate(self.blocks):
            prompt = layer_prompt(i, self.g_prompt_layer_idx, self.e_prompt_layer_idx, g_prompt, batched,
                                  self.use_prefix_tune_for_g_prompt, self.use_prefix_tune_for_e_prompt)
            if prompt is not None and prompt[0]:
                tokens = prefix_block(block, tokens, prompt[1])
            elif prompt is not None:
                tokens = block(torch.cat([prompt[1], tokens], dim=1))
            elif i == last and head_only and is_rowwise_norm(self.norm):  # the last block on the head's rows only
                tokens, sliced = block_rows(block, tokens, *self._head_rows(tokens.shape[1])), True
            else:
                tokens = block(tokens)
            if block_outputs:
                outputs.append(tokens)
        tokens = self.norm(tokens)
        if head_only and not sliced:
            tokens = tokens[:, slice(*self._head_rows(tokens.shape[1]))]
        res["x"] = tokens
        cls_row = 0 if head_only else self.total_prompt_len
        pre_logits = tokens[:, cls_row] if self.head_type == "token" else tokens.mean(dim=1)
        res["pre_logits"] = pre_logits
        res["logits"] = self.head(self.head_drop(self.fc_norm(pre_logits)))
        if block_outputs:
            res["block_outputs"] = outputs
        return res
