"""``dualprompt``: DualPrompt (Wang et al., ECCV 2022) on the frozen backbone — ``DualPromptTextEncoder`` for text,
``DualPromptViT`` for images (``l2p_fast.models``), both with ``final_tokens='head'``.

The paper's and the DualPrompt port's defaults: G-prompt length 5 in layers 0–1, E-prompts of length 5 in layers
2–4 with prefix-tuning, pool ``pool_size`` (10), top-``top_k`` (1) by the frozen encoder's query, batch vote,
train-time task mask (task t trains E-prompt t), CLS head (``config.resolve`` fills top_k, the vote, the mask and
the head from ``PROMPT_DEFAULTS`` when unset). On a backbone with fewer layers the layers that exist are kept;
without any of 2–4, the E-prompt takes the last layer and the G-prompt the paper's layers before it (2 layers:
G 0, E 1; 1 layer: E 0 only).

Loss: masked cross-entropy − λ · ``reduce_sim`` with λ = ``pull_lambda``, as ``l2p`` (the port's
``pull_constraint_coeff`` is 1.0; the shared field keeps L2P's 0.1 unless set). Learning rate (``METHOD_DEFAULTS``):
0.03 with Adam, the port's configured ``--lr``, as ``l2p`` takes the L2P port's. The port multiplies it by
batch / 256 (0.0028 at its batch 24 per device); the trainer does not, so both prompt methods compare at one
setting, and on the short budgets of ``wordnet20`` the unscaled rate is the one that learns within an epoch.
The trainer counts prompt use from ``out["prompt_idx"]``, here the E-prompt ids.
Text queries come from the trainer's feature cache (the frozen encoder's mean-pooled embedding); images compute
theirs on the fly with ``DualPromptViT.query`` (the frozen final-LayerNorm CLS, the port's ``original_model``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..backbones import Backbone
from .prompting import L2P

G_LAYERS = (0, 1)
E_LAYERS = (2, 3, 4)
G_PROMPT_LENGTH = 5


def prompt_layers(depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(G layers, E layers) of a backbone with ``depth`` layers: the paper's 0–1 and 2–4 where they exist; with
    none of 2–4, E on the last layer and G on the paper's layers before it."""
    g_layers = tuple(i for i in G_LAYERS if i < depth)
    e_layers = tuple(i for i in E_LAYERS if i < depth)
    if not e_layers:
        e_layers = (depth - 1,)
        g_layers = tuple(i for i in g_layers if i < depth - 1)
    return g_layers, e_layers


class DualPrompt(L2P):
    """DualPrompt: G-prompt, E-prompt pool, prefix-tuning; forward and loss as ``l2p``'s."""

    name = "dualprompt"

    def build(self, backbone: Backbone, num_classes: int) -> nn.Module:
        cfg = self.config
        options = dict(self.pool_options(num_classes), g_prompt_length=G_PROMPT_LENGTH)
        encoder = backbone.copy()
        if backbone.kind == "text":
            from ...models import DualPromptTextEncoder

            g_layers, e_layers = prompt_layers(encoder.config.num_hidden_layers)
            return DualPromptTextEncoder(encoder, tokenizer=backbone.tokenizer, max_length=cfg.max_length,
                                         g_prompt_layer_idx=g_layers, e_prompt_layer_idx=e_layers, **options)
        from ...models import DualPromptViT

        g_layers, e_layers = prompt_layers(len(encoder.blocks))
        return DualPromptViT.from_timm(encoder, g_prompt_layer_idx=g_layers, e_prompt_layer_idx=e_layers, **options)

    def forward(self, inputs: Any, cached: Tensor | None, task_id: int, train: bool) -> dict[str, Any]:
        if self.kind == "text":
            return self.model(**inputs, task_id=task_id, cls_features=cached, train=train)
        if cached is None:
            cached = self.model.query(inputs)
        return self.model(inputs, task_id=task_id, cls_features=cached, train=train)
