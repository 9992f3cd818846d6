"""DualPrompt (Wang et al., ECCV 2022) on the L2P pool's fused path: the E-prompt pool, its prefix gather,
prefix attention. See docs/design/dualprompt.md.

- ``FusedEPrompt`` (``eprompt.py``): drop-in for the DualPrompt port's ``EPrompt``.
- ``select_prompts`` (``select.py``): E-prompt selection by the L2P pool's op.
- ``prefix_attention`` / ``PrefixAttention`` (``attention.py``): attention with prefix keys/values,
  tokens and prefix attended separately and merged by log-sum-exp.
- ``reference`` (``reference.py``): plain-PyTorch references from the paper's equations.
"""

from . import reference
from .attention import PrefixAttention, prefix_attention
from .eprompt import FusedEPrompt
from .select import select_prompts

__all__ = ["FusedEPrompt", "PrefixAttention", "prefix_attention", "reference", "select_prompts"]
