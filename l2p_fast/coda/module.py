"""``FusedCodaPrompt``: drop-in for CODA-Prompt's ``CodaPrompt`` (GT-RIPL/CODA-Prompt ``models/zoo.py``).

Same constructor ``(emb_d, n_tasks, prompt_param=[M, Lp, μ], key_dim)``, parameter names ``e_p_{l}`` (M, Lp, D),
``e_k_{l}`` (M, Dk), ``e_a_{l}`` (M, Dk) per prompted layer l, ``task_count``, ``process_task_count()`` and
``forward(x_querry, l, x_block, train, task_id) → ([Ek, Ev] | None, loss, x_block)``. The mix runs through the fused
op ``l2p_fast.ops.coda.coda_prompt`` (``backend``). Differences, each deliberate:

- the loss is always a tensor (0 when μ = 0, outside training, or for a layer without prompts), never the int 0;
- the orthogonality loss runs on any device (the original calls ``.cuda()``);
- ``layers`` (default 0–4, the original's fixed list) and ``generator`` (the Gram–Schmidt draws) are keywords;
- the Gram–Schmidt initialisation refuses a pool larger than a row's width (the original then divides by a zero
  norm) with a ``ValueError``.

Odd Lp gives a key prefix one token shorter than the value prefix, as the original; the prompted models refuse odd
Lp (an attention needs keys and values of one length; see docs/design/coda.md). Shapes: B batch, D width (emb_d),
Dk key width, M pool, F used rows, Lp prompt length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops.coda import coda_prompt
from . import reference as ref

DEFAULT_LAYERS = (0, 1, 2, 3, 4)


class FusedCodaPrompt(nn.Module):
    """CODA-Prompt's per-layer component pools; ``mix`` / ``forward`` give a layer's prompt for a query (B, Dk)."""

    def __init__(
        self, emb_d: int, n_tasks: int, prompt_param: Sequence[float], key_dim: int = 768, *,
        layers: Sequence[int] = DEFAULT_LAYERS, backend: str = "auto", generator: torch.Generator | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        for name, value in (("emb_d", emb_d), ("n_tasks", n_tasks), ("key_dim", key_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(prompt_param, Sequence) or len(prompt_param) != 3:
            raise ValueError(f"prompt_param: expected [pool_size, length, ortho_mu], got {prompt_param!r}")
        pool, length, mu = int(prompt_param[0]), int(prompt_param[1]), float(prompt_param[2])
        if pool < n_tasks:
            raise ValueError(f"prompt_param[0] (pool_size): expected at least n_tasks = {n_tasks} rows, got {pool}")
        if length < 1:
            raise ValueError(f"prompt_param[1] (length): expected a positive prompt length, got {length}")
        if not mu >= 0 or mu == float("inf"):
            raise ValueError(f"prompt_param[2] (ortho_mu): expected a finite number >= 0, got {mu}")
        used = n_tasks * (pool // n_tasks)  # rows some task uses; Gram–Schmidt makes them orthonormal
        if used > min(key_dim, length * emb_d):
            raise ValueError(f"prompt_param[0] (pool_size): {used} orthonormal rows need key_dim and Lp·emb_d >= "
                             f"{used}, got key_dim={key_dim}, Lp·emb_d={length * emb_d}")
        layers = tuple(layers)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers) or len(set(layers)) != len(
                layers):
            raise ValueError(f"layers: expected distinct non-negative layer indices, got {list(layers)}")
        self.emb_d, self.key_d, self.n_tasks = emb_d, key_dim, n_tasks
        self.e_pool_size, self.e_p_length, self.ortho_mu = pool, length, mu
        self.e_layers = list(layers)
        self.backend = backend
        self.task_count = 0
        for e in self.e_layers:
            setattr(self, f"e_p_{e}", nn.Parameter(torch.empty(pool, length, emb_d)))
            setattr(self, f"e_k_{e}", nn.Parameter(torch.empty(pool, key_dim)))
            setattr(self, f"e_a_{e}", nn.Parameter(torch.empty(pool, key_dim)))
        self._init_rows(generator)

    def task_rows(self, task: int | None = None) -> tuple[int, int]:
        """(s, f): the trainable rows [s, f) of ``task`` (default the current ``task_count``)."""
        return ref.task_rows(self.e_pool_size, self.n_tasks, self.task_count if task is None else task)

    def used_rows(self, train: bool) -> tuple[int, int]:
        """(start, stop) of the op: rows [0, f) used, rows [0, s) frozen in training (none in evaluation)."""
        start, stop = self.task_rows()
        return (start if train else 0), stop

    @torch.no_grad()
    def _init_rows(self, generator: torch.Generator | None) -> None:
        start, stop = self.task_rows()
        for e in self.e_layers:
            for kind in ("p", "k", "a"):
                param = getattr(self, f"e_{kind}_{e}")
                param.copy_(ref.gram_schmidt_rows(param, start, stop, generator))

    def process_task_count(self, generator: torch.Generator | None = None) -> None:
        """Advance to the next task: its rows get the Gram–Schmidt initialisation, earlier rows are kept."""
        if self.task_count + 1 >= self.n_tasks:
            raise ValueError(f"task_count: already at the last task {self.task_count} of n_tasks = {self.n_tasks}")
        self.task_count += 1
        self._init_rows(generator)

    def set_task(self, task: int, generator: torch.Generator | None = None) -> None:
        """Advance to ``task`` (each new task's rows get the Gram–Schmidt initialisation); going back raises."""
        if isinstance(task, bool) or not isinstance(task, int) or not self.task_count <= task < self.n_tasks:
            raise ValueError(f"task: expected {self.task_count} <= task < n_tasks = {self.n_tasks}, got {task!r}")
        while self.task_count < task:
            self.process_task_count(generator)

    def layer_params(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(keys (M, Dk), attn (M, Dk), prompt (M, Lp, D)) of a prompted layer."""
        return getattr(self, f"e_k_{layer}"), getattr(self, f"e_a_{layer}"), getattr(self, f"e_p_{layer}")

    def mix(self, x_querry: Tensor, layer: int, train: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(mixed prompt (B, Lp, D), weights α (B, F), orthogonality loss ()) of prompted ``layer`` for the query
        (B, Dk); in training rows of earlier tasks are used but get no gradient."""
        if layer not in self.e_layers:
            raise ValueError(f"layer: expected one of the prompted layers {self.e_layers}, got {layer!r}")
        keys, attn, prompt = self.layer_params(layer)
        start, stop = self.used_rows(train)
        mixed, weights = coda_prompt(x_querry, keys, attn, prompt, start, stop, backend=self.backend)
        if train and self.ortho_mu > 0:
            loss = ref.ortho_loss(*(ref.slice_rows(t, start, stop, True) for t in (keys, attn, prompt)),
                                  self.ortho_mu)
        else:
            loss = keys.new_zeros(())
        return mixed, weights, loss

    def forward(
        self, x_querry: Tensor, l: int, x_block: Tensor, train: bool = False, task_id: int | None = None  # noqa: E741
    ) -> tuple[list[Tensor] | None, Tensor, Tensor]:
        """The original's call: ``([Ek (B, ⌊Lp/2⌋, D), Ev (B, Lp − ⌊Lp/2⌋, D)] or None, loss (), x_block)``.

        ``task_id`` is ignored (as in the original: the slice follows ``task_count``).
        """
        if l not in self.e_layers:
            return None, x_querry.new_zeros(()), x_block
        mixed, _, loss = self.mix(x_querry, l, train)
        return list(ref.split_prefix(mixed)), loss, x_block

    def extra_repr(self) -> str:
        return (f"emb_d={self.emb_d}, key_dim={self.key_d}, n_tasks={self.n_tasks}, pool_size={self.e_pool_size}, "
                f"length={self.e_p_length}, ortho_mu={self.ortho_mu}, layers={self.e_layers}, "
                f"task_count={self.task_count}, backend={self.backend!r}")
