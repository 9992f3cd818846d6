"""Prompted models: ``L2PViT`` (timm VisionTransformer), ``L2PTextEncoder`` (Hugging Face BERT-style),
``DualPromptViT`` and ``DualPromptTextEncoder`` (DualPrompt on those backbones).

``L2PViT`` and ``L2PTextEncoder`` use the prompt pool only through ``FusedPromptPool(..., backend=backend)``
and build the prompted sequence with the one-pass ``assemble`` op (``l2p_fast.ops.assemble``).
"""

from ..ops.assemble import assemble
from ..reference import assemble_reference
from .dualprompt_text import DualPromptTextEncoder
from .dualprompt_vit import DualPromptViT
from .text import L2PTextEncoder
from .vit import L2PViT

__all__ = ["DualPromptTextEncoder", "DualPromptViT", "L2PTextEncoder", "L2PViT", "assemble", "assemble_reference"]
