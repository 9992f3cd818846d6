"""CODA-Prompt (Smith et al., CVPR 2023) on the package's fused path. See docs/design/coda.md.

- ``reference`` (``reference.py``): plain PyTorch from the paper's equations (weights, mix, slicing, orthogonality
  loss, Gram–Schmidt initialisation).
- ``coda_prompt`` (``l2p_fast.ops.coda``): the fused op (weights without (B, M, Dk), mix in one product).
- ``FusedCodaPrompt`` (``module.py``): drop-in for the original ``CodaPrompt`` module.
"""

from ..ops.coda import coda_prompt
from . import reference
from .module import FusedCodaPrompt

__all__ = ["FusedCodaPrompt", "coda_prompt", "reference"]
