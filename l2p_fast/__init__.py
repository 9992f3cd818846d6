"""l2p_fast: fused-kernel Learning to Prompt (L2P) for continual learning.

``FusedPromptPool`` is a drop-in replacement for the ``Prompt`` module of JH-LEE-KR/l2p-pytorch; DualPrompt's
``FusedEPrompt`` and ``PrefixAttention`` / ``prefix_attention`` (``l2p_fast.dualprompt``) for the DualPrompt port's
``EPrompt`` and ``PreT_Attention``; CODA-Prompt's ``FusedCodaPrompt`` (``l2p_fast.coda``) for ``CodaPrompt``.
"""

from . import ops, reference  # importing ops fills the dispatcher's table (l2p_fast.dispatch)
from .coda import FusedCodaPrompt
from .dispatch import available_backends
from .dualprompt import FusedEPrompt, PrefixAttention, prefix_attention
from .memory import (
    cpu_cache_stats,
    cpu_stream_threshold,
    empty_cpu_cache,
    set_cpu_cache_limit,
    set_cpu_stream_threshold,
)
from .pool import FusedPromptPool

__all__ = [
    "FusedCodaPrompt",
    "FusedEPrompt",
    "FusedPromptPool",
    "PrefixAttention",
    "available_backends",
    "cpu_cache_stats",
    "cpu_stream_threshold",
    "empty_cpu_cache",
    "ops",
    "prefix_attention",
    "reference",
    "set_cpu_cache_limit",
    "set_cpu_stream_threshold",
]
__version__ = "0.1.0"
