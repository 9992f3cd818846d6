"""Every op of l2p_fast, one file per op; importing this package fills the dispatcher's table.

- ``pool.py``: ``pool_forward`` (pool mode, §4). reference ``reference.pool_forward``; native
  ``l2p_fast::pool_forward`` (C++ autograd); Triton ``l2p_fast::triton_pool_forward``, launchers in
  ``pool_triton.py``.
- ``prepend.py``: ``prepend`` (non-pool mode). reference/native ``reference.prepend``; Triton
  ``l2p_fast::triton_prepend`` (launcher ``pool_triton.launch_prepend``).
- ``query_reduce.py``: ``query_reduce`` (the token query alone). reference ``reference.query``; native
  ``l2p_fast::query_reduce``.
- ``assemble.py``: ``assemble`` (the prompted models' sequence). reference ``reference.assemble``;
  native ``l2p_fast::assemble``; Triton ``l2p_fast::assemble_triton``, launchers in ``assemble_triton.py``.
- ``prefix_gather.py``: ``prefix_gather`` (DualPrompt's per-layer prefixes, ``l2p_fast.dualprompt``).
  reference ``reference_prefix_gather`` beside it; cpu/cuda ``l2p_fast::prefix_gather``; Triton
  ``l2p_fast::prefix_gather_triton`` in ``prefix_gather_triton.py``.

Each op file holds, for its op: the schema of its Python custom ops, the fakes (meta kernels) of
its native ops, the autograd, and the per-backend implementations it registers in
``l2p_fast.dispatch.IMPLEMENTATIONS``. Native schemas and kernels live in ``csrc/``, Triton device code
in ``kernels/`` (installed as ``l2p_fast.kernels``), the pure-PyTorch references in
``l2p_fast/reference.py``, argument checks in ``l2p_fast/validation.py``, the query-mode table and
the compute dtype in ``l2p_fast/modes.py``. Shapes: B batch, N tokens, D width, M pool, K top-k,
Lp prompt length.
"""

from . import assemble, pool, prefix_gather, prepend, query_reduce
from .pool import native_pool_forward, pool_outputs, triton_pool_forward
from .prepend import triton_prepend
from .query_reduce import query_reduce as native_query_reduce

__all__ = [
    "assemble",
    "native_pool_forward",
    "native_query_reduce",
    "pool",
    "pool_outputs",
    "prefix_gather",
    "prepend",
    "query_reduce",
    "triton_pool_forward",
    "triton_prepend",
]
