"""``L2PViT``: the prompted Vision Transformer of docs/behaviour.md §5 on any timm ``VisionTransformer``.

Sequence ``[CLS, K·Lp prompt tokens, patches]`` plus one positional table of length 1 + K·Lp + N
(the prompt slots start as copies of the CLS position), written in one pass by ``assemble``. The
query is the final-LayerNorm CLS token of the prompt-free pass through the SAME frozen modules
(no second copy of the weights), with no grad and in eval mode. State-dict keys are the port's:
timm's names plus ``prompt.prompt`` and ``prompt.prompt_key``, with ``pos_embed`` of length
1 + K·Lp + N; a plain timm state dict (``pos_embed`` of length 1 + N) is resized on load.
The last block computes only the rows that are read (``vit_rows``): the CLS row in the query pass,
and with ``final_tokens='head'`` the rows the head reads in the prompted pass.
Shapes: B batch, N patches, D width, M pool, K top-k, Lp prompt length, R rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.assemble import assemble
from ..pool import FusedPromptPool
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
    walk_modules,
)
from .vit_rows import (
    block_from_qkv,
    block_with_frozen_rows,
    blocks_rows,
    first_qkv,
    is_rowwise_norm,
    is_stochastic,
    supports_shared_rows,
)

TRAINABLE = ("prompt.", "head.")


def expand_pos_embed(pos_embed: Tensor, prompt_len: int) -> Tensor:
    """(1, 1 + N, D) → (1, 1 + prompt_len + N, D): the prompt slots get copies of the CLS position."""
    cls_pos = pos_embed[:, :1]
    return torch.cat([cls_pos, cls_pos.expand(-1, prompt_len, -1), pos_embed[:, 1:]], dim=1)


def _check_vit(vit: nn.Module) -> None:
    """Raise ``ValueError`` unless ``vit`` is a timm VisionTransformer with the port's layout."""
    needed = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "fc_norm", "head")
    missing = [name for name in needed if getattr(vit, name, None) is None]
    if missing:
        raise ValueError(f"model: expected a timm VisionTransformer with a class token, missing {missing}")
    unsupported = {
        "reg_tokens": getattr(vit, "reg_token", None) is not None,
        "no_embed_class": bool(getattr(vit, "no_embed_class", False)),
        "dynamic_img_size": bool(getattr(vit, "dynamic_img_size", False)),
        "global_pool='map'/'prr'": getattr(vit, "attn_pool", None) is not None,
        "patch_drop_rate > 0": not isinstance(getattr(vit, "patch_drop", nn.Identity()), nn.Identity),
    }
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise ValueError(f"model: the L2P layout (docs/behaviour.md §5) does not support {bad}")


class L2PViT(nn.Module):
    """L2P on a frozen timm ``VisionTransformer``: [CLS, prompts, patches] + positions → blocks → head.

    Built from an existing ViT whose modules it adopts (not copies); see ``from_timm``.
    Trainable: ``prompt.prompt`` (M, Lp, D), ``prompt.prompt_key`` (M, D) and ``head``.
    ``final_tokens``: 'all' runs the last block on every token; 'head' only on the rows the head
    reads (CLS for 'token', the K·Lp prompts for 'prompt', both for 'token+prompt', all for 'gap'),
    keys and values still from every token: same logits, similarities and gradients up to rounding,
    but ``forward``'s ``x`` then holds just those rows.
    """

    def __init__(
        self,
        vit: nn.Module,
        *,
        length: int = 5,
        pool_size: int = 10,
        top_k: int = 5,
        embedding_key: str = "cls",
        batchwise_prompt: bool = True,
        head_type: str = "prompt",
        use_prompt_mask: bool = False,
        prompt_init: str = "uniform",
        prompt_key_init: str = "uniform",
        backend: str = "auto",
        final_tokens: str = "all",
        vote_group: object = None,
    ) -> None:
        super().__init__()
        _check_vit(vit)
        check_head_type(head_type)
        check_final_tokens(final_tokens)
        width = vit.cls_token.shape[-1]
        prompt = FusedPromptPool(
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
        self.prompt_len = length * top_k
        num_patches = vit.pos_embed.shape[1] - 1
        if num_patches != vit.patch_embed.num_patches:
            raise ValueError(f"model: pos_embed has {num_patches + 1} rows, expected 1 + {vit.patch_embed.num_patches}")
        self.cls_token = vit.cls_token
        self.pos_embed = nn.Parameter(expand_pos_embed(vit.pos_embed.detach(), self.prompt_len).clone())
        self.patch_embed = vit.patch_embed
        self.pos_drop = vit.pos_drop
        self.prompt = prompt.to(device=vit.cls_token.device)
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.head = vit.head
        self.embed_dim = width
        self.num_patches = num_patches
        self.num_classes = getattr(vit, "num_classes", None)
        self.head_type = head_type
        self.use_prompt_mask = use_prompt_mask
        self.backend = backend
        self.final_tokens = final_tokens
        # when the query is computed here, the first block's projections of the frozen rows come from the query
        # pass (exact up to rounding; off: the prompted pass recomputes them)
        self.share_first_block = True
        self._register_load_state_dict_pre_hook(self._resize_pos_embed_on_load)
        freeze_all_but(self, TRAINABLE)

    @classmethod
    def from_timm(
        cls,
        model_or_name: nn.Module | str,
        *,
        pretrained: bool = False,
        length: int = 5,
        pool_size: int = 10,
        top_k: int = 5,
        embedding_key: str = "cls",
        batchwise_prompt: bool = True,
        head_type: str = "prompt",
        use_prompt_mask: bool = False,
        num_classes: int | None = None,
        backend: str = "auto",
        prompt_init: str = "uniform",
        prompt_key_init: str = "uniform",
        final_tokens: str = "all",
        vote_group: object = None,
        **timm_kwargs: object,
    ) -> L2PViT:
        """Build from a timm VisionTransformer instance or a model name (``timm.create_model``).

        ``pretrained`` and ``timm_kwargs`` go to ``timm.create_model`` (names only); ``num_classes``
        sizes the head (an instance's head is reset when it differs).
        """
        if isinstance(model_or_name, str):
            import timm

            if num_classes is not None:
                timm_kwargs["num_classes"] = num_classes
            vit = timm.create_model(model_or_name, pretrained=pretrained, **timm_kwargs)
        elif isinstance(model_or_name, nn.Module):
            if pretrained or timm_kwargs:
                raise ValueError(
                    f"pretrained, timm_kwargs: only apply to a model name, got an instance with "
                    f"pretrained={pretrained}, timm_kwargs={sorted(timm_kwargs)}"
                )
            vit = model_or_name
            if num_classes is not None and num_classes != getattr(vit, "num_classes", None):
                vit.reset_classifier(num_classes)
        else:
            raise TypeError(f"model_or_name: expected a timm model or a model name, got {type(model_or_name).__name__}")
        return cls(
            vit,
            length=length,
            pool_size=pool_size,
            top_k=top_k,
            embedding_key=embedding_key,
            batchwise_prompt=batchwise_prompt,
            head_type=head_type,
            use_prompt_mask=use_prompt_mask,
            prompt_init=prompt_init,
            prompt_key_init=prompt_key_init,
            backend=backend,
            final_tokens=final_tokens,
            vote_group=vote_group,
        )

    def _resize_pos_embed_on_load(self, state_dict: dict, prefix: str, *_: object) -> None:
        """A plain timm ``pos_embed`` (1, 1 + N, D) gets its prompt slots from the CLS position."""
        key = prefix + "pos_embed"
        value = state_dict.get(key)
        if value is not None and value.dim() == 3 and value.shape[1] == 1 + self.num_patches:
            state_dict[key] = expand_pos_embed(value, self.prompt_len)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters L2P trains: prompts (M, Lp, D), keys (M, D), head weight and bias."""
        return [p for p in self.parameters() if p.requires_grad]

    def _check_image(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a float image batch (B, C, H, W), got {shape}")

    def forward_backbone(self, x: Tensor) -> Tensor:
        """Prompt-free pass (timm's ``forward_features``): images (B, C, H, W) → final-normed tokens (B, 1 + N, D)."""
        self._check_image(x)
        return self._backbone_tokens(self.patch_embed(x))

    def _backbone_input(self, patches: Tensor) -> Tensor:
        """Prompt-free block input: patch embeddings (B, N, D) → [CLS, patches] + positions (B, 1 + N, D)."""
        pos = torch.cat([self.pos_embed[:, :1], self.pos_embed[:, 1 + self.prompt_len :]], dim=1)
        seq = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + pos
        return self.norm_pre(self.pos_drop(seq))

    def _backbone_tokens(self, patches: Tensor) -> Tensor:
        """Prompt-free pass from patch embeddings (B, N, D) → final-normed tokens (B, 1 + N, D)."""
        return self.norm(self.blocks(self._backbone_input(patches)))

    def _final_rows(self, x: Tensor, start: int, stop: int, blocks: nn.Module | None = None) -> Tensor:
        """Final-normed rows ``start:stop`` (B, R, D) of block input x (B, S, D) through ``blocks`` (default: all);
        the last block computes only those rows."""
        blocks = self.blocks if blocks is None else blocks
        if is_rowwise_norm(self.norm):
            return self.norm(blocks_rows(blocks, x, start, stop))
        return self.norm(blocks(x))[:, start:stop]  # an unknown final norm: slice after it

    def _can_share_first_block(self, patches: Tensor) -> bool:
        """Whether the prompted pass may take the first block's qkv of its frozen rows (CLS, patches) from the
        query pass: a row-wise timm block that behaves alike in both passes, and no gradient wanted there."""
        blocks = self.blocks
        if not self.share_first_block or not isinstance(blocks, nn.Sequential) or len(blocks) < 2:
            return False
        if blocks._forward_hooks or blocks._forward_pre_hooks or not supports_shared_rows(blocks[0]):
            return False
        if is_stochastic(self.pos_drop) or not is_rowwise_norm(self.norm_pre):
            return False
        if not torch.is_grad_enabled():
            return True
        if patches.requires_grad or self.cls_token.requires_grad or self.pos_embed.requires_grad:
            return False
        params = (p for m in walk_modules(blocks[0]) for p in m._parameters.values())
        return not any(p is not None and p.requires_grad for p in params)

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """The query ``cls_features`` (B, D): final-LayerNorm CLS of the frozen prompt-free pass, no grad, eval mode.

        Equals ``forward_backbone(x)[:, 0]`` up to float rounding: the last block computes only the CLS row.
        """
        self._check_image(x)
        return self._query_from_patches(self.patch_embed(x))[0]

    @torch.no_grad()
    def _query_from_patches(self, patches: Tensor, keep_first_qkv: bool = False) -> tuple[Tensor, Tensor | None]:
        """The query (B, D) from patch embeddings (B, N, D), and with ``keep_first_qkv`` the first block's qkv
        (B, 1 + N, 3A) of the prompt-free rows [CLS, patches] (else None)."""
        with eval_mode(self):
            x = self._backbone_input(patches)
            if not keep_first_qkv:
                return self._final_rows(x, 0, 1)[:, 0], None
            qkv = first_qkv(self.blocks[0], x)
            x = block_from_qkv(self.blocks[0], x, qkv)
            return self._final_rows(x, 0, 1, self.blocks[1:])[:, 0], qkv

    def forward(
        self, x: Tensor, task_id: int = -1, cls_features: Tensor | None = None, train: bool = False
    ) -> dict[str, Tensor | int]:
        """Images (B, C, H, W) → the port's dict: pool outputs, ``x``, ``pre_logits`` (B, D), ``logits``.

        ``x``: the final-normed tokens (B, 1 + K·Lp + N, D) with ``final_tokens='all'``; with 'head' only
        the rows the head reads (B, R, D): R = 1 ('token'), K·Lp ('prompt'), 1 + K·Lp ('token+prompt'),
        1 + K·Lp + N ('gap'). ``cls_features`` (B, D): precomputed queries; None computes them as
        ``query`` does. With ``use_prompt_mask`` and ``train``, task ``task_id`` uses prompt ids t·K … t·K+K−1.
        """
        self._check_image(x)
        patches = self.patch_embed(x)  # (B, N, D)
        shared_qkv = None  # the first block's qkv of [CLS, patches], from the query pass
        if cls_features is None:  # the frozen patch embedding is shared by the query and the prompted pass
            cls_features, shared_qkv = self._query_from_patches(patches.detach(), self._can_share_first_block(patches))
        prompt_mask = None
        if self.use_prompt_mask and train:
            prompt_mask = task_prompt_mask(task_id, self.prompt.top_k, self.prompt.pool_size, x.shape[0], x.device)
        # with a 'cls' query the pool never reads the tokens: hand it one, so it gathers next to nothing
        pool_input = patches[:, :1] if self.prompt.embedding_key == "cls" else patches
        with torch.autocast(x.device.type, enabled=False):  # similarities stay in fp32
            res = self.prompt(pool_input, prompt_mask=prompt_mask, cls_features=cls_features)
        res = {key: res[key] for key in POOL_KEYS}
        seq = assemble(
            patches, self.prompt.prompt, res["prompt_idx"], self.cls_token, self.pos_embed, backend=self.backend
        )
        seq = self.norm_pre(self.pos_drop(seq))
        blocks = self.blocks
        if shared_qkv is not None:  # the first block projects only the prompt rows
            seq = block_with_frozen_rows(blocks[0], seq, shared_qkv, 1, 1 + res["total_prompt_len"])
            blocks = blocks[1:]
        if self.final_tokens == "head":
            start, stop = head_rows(self.head_type, res["total_prompt_len"], seq.shape[1])
            seq = self._final_rows(seq, start, stop, blocks)
            pre_logits = pool_rows(seq, self.head_type)
        else:
            seq = self.norm(blocks(seq))
            pre_logits = pool_tokens(seq, self.head_type, res["total_prompt_len"])
        res["x"] = seq
        res["pre_logits"] = pre_logits
        res["logits"] = self.head(self.head_drop(self.fc_norm(pre_logits)))
        return res

    def extra_repr(self) -> str:
        return (
            f"head_type={self.head_type!r}, prompt_len={self.prompt_len}, num_patches={self.num_patches}, "
            f"final_tokens={self.final_tokens!r}"
        )
