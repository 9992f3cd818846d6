"""The DualPrompt classes are exported by the package, as ``FusedPromptPool`` is."""

import l2p_fast
import l2p_fast.models
from l2p_fast.dualprompt import FusedEPrompt, PrefixAttention, prefix_attention
from l2p_fast.models.dualprompt_text import DualPromptTextEncoder
from l2p_fast.models.dualprompt_vit import DualPromptViT


def test_package_exports() -> None:
    assert l2p_fast.FusedEPrompt is FusedEPrompt
    assert l2p_fast.PrefixAttention is PrefixAttention
    assert l2p_fast.prefix_attention is prefix_attention
    assert {"FusedEPrompt", "PrefixAttention", "prefix_attention"} <= set(l2p_fast.__all__)


def test_models_export() -> None:
    assert l2p_fast.models.DualPromptViT is DualPromptViT
    assert l2p_fast.models.DualPromptTextEncoder is DualPromptTextEncoder
    assert {"DualPromptViT", "DualPromptTextEncoder"} <= set(l2p_fast.models.__all__)
