"""l2p_fast: fused-kernel Learning to Prompt (L2P) for continual learning.

``FusedPromptPool`` is a drop-in replacement for the ``Prompt`` module of JH-LEE-KR/l2p-pytorch.
"""

from . import ops, reference  # importing ops fills the dispatcher's table (l2p_fast.dispatch)
from .dispatch import available_backends
from .memory import (
    cpu_cache_stats,
    cpu_stream_threshold,
    empty_cpu_cache,
    set_cpu_cache_limit,
    set_cpu_stream_threshold,
)
from .pool import FusedPromptPool

__all__ = [
    "FusedPromptPool",
    "available_backends",
    "cpu_cache_stats",
    "cpu_stream_threshold",
    "empty_cpu_cache",
    "ops",
    "reference",
    "set_cpu_cache_limit",
    "set_cpu_stream_threshold",
]
__version__ = "0.1.0"
