"""``FusedEPrompt``: drop-in for the ``EPrompt`` module of the DualPrompt port (JH-LEE-KR/dualprompt-pytorch).

Same constructor arguments, ``forward(x_embed, prompt_mask=None, cls_features=None)``, output dict
keys and parameter names/shapes (``prompt``, ``prompt_key``), so the port's checkpoints load. Selection
is the L2P pool's fused op (``select.py``), the gather one ``prefix_gather`` op for all layers.

Differences from the port (its bugs; docs/design/dualprompt.md):
- ``layout='permute'`` (default) gives each sample its own prompts with key halves as keys and value
  halves as values; the port's reshape (samples and halves mixed when B > 1) only with ``layout='port'``.
- ``same_key_value=True`` raises ``ValueError`` here; the port's constructor raises ``TypeError``.
- Non-pool mode owns one learnable prompt per layer, made at construction (the port makes a fresh,
  untrainable one inside every forward).
- ``prompt_key=False`` (prompt-tuning only): the keys are the mean of the current prompts over layers and
  tokens, recomputed each call (differentiable); with prefix-tuning it raises ``ValueError`` (the port's
  mean over that layout is not a (M, D) key).
Beyond the port: ``vote_group`` (None: per-rank vote; ``"world"`` or a ProcessGroup) sums the batch vote's
counts over the processes before the pick, as the L2P pool's (docs/behaviour.md §9).
Shapes: B batch, N tokens, D width, H heads, Dh = D / H, M pool, K top-k, Lp prompt length, L layers.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import dispatch
from ..ops.prefix_gather import prefix_gather
from ..pool import _init_parameter
from ..validation import validate_config, validate_forward, validate_vote_group
from .reference import LAYOUTS
from .select import select_prompts

OUTPUT_ORDER = (
    "prompt_idx",
    "similarity",
    "selected_key",
    "prompt_key_norm",
    "x_embed_norm",
    "reduce_sim",
    "batched_prompt",
)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


class FusedEPrompt(nn.Module):
    """E-prompt pool of DualPrompt: M prompts per layer for L layers, keys (M, D), selected as the L2P pool.

    ``prompt``: (L, 2, M, Lp, H, Dh) with ``use_prefix_tune_for_e_prompt`` (key half, value half),
    else (L, M, Lp, D); non-pool mode drops the M axis. ``forward`` returns the port's dict;
    ``batched_prompt`` is (L, B, 2, K·Lp, H, Dh) or (L, B, K·Lp, D). ``vote_group``: as
    ``FusedPromptPool``'s (docs/behaviour.md §9), settable after construction.
    """

    def __init__(
        self,
        length: int = 5,
        embed_dim: int = 768,
        embedding_key: str = "mean",
        prompt_init: str = "uniform",
        prompt_pool: bool = False,
        prompt_key: bool = False,
        pool_size: int | None = None,
        top_k: int | None = None,
        batchwise_prompt: bool = False,
        prompt_key_init: str = "uniform",
        num_layers: int = 1,
        use_prefix_tune_for_e_prompt: bool = False,
        num_heads: int = -1,
        same_key_value: bool = False,
        *,
        layout: str = "permute",
        backend: str = "auto",
        vote_group: object = None,
    ) -> None:
        super().__init__()
        validate_config(
            length=length, embed_dim=embed_dim, embedding_key=embedding_key, prompt_init=prompt_init,
            prompt_pool=prompt_pool, pool_size=pool_size, top_k=top_k, prompt_key_init=prompt_key_init,
            backend=backend,
        )  # fmt: skip
        _check_positive("num_layers", num_layers)
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        if same_key_value:
            raise ValueError("same_key_value: expected False (shared key/value halves are not supported), got True")
        if use_prefix_tune_for_e_prompt:
            _check_positive("num_heads", num_heads)
            if embed_dim % num_heads:
                raise ValueError(f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}")
            if prompt_pool and not prompt_key:
                raise ValueError("prompt_key: prefix-tuning needs learnable keys (prompt_key=True), got False")
        self.length = length
        self.embed_dim = embed_dim
        self.embedding_key = embedding_key
        self.prompt_init = prompt_init
        self.prompt_key_init = prompt_key_init
        self.prompt_pool = prompt_pool
        self.pool_size = pool_size
        self.top_k = top_k
        self.batchwise_prompt = batchwise_prompt
        self.num_layers = num_layers
        self.use_prefix_tune_for_e_prompt = use_prefix_tune_for_e_prompt
        self.num_heads = num_heads
        self.same_key_value = same_key_value
        self.learnable_key = prompt_key
        self.layout = layout
        self.backend = backend
        pool = (pool_size,) if prompt_pool else ()
        if use_prefix_tune_for_e_prompt:
            shape = (num_layers, 2, *pool, length, num_heads, embed_dim // num_heads)
        else:
            shape = (num_layers, *pool, length, embed_dim)
        self.prompt = _init_parameter(shape, prompt_init)
        if prompt_pool and prompt_key:
            self.prompt_key = _init_parameter((pool_size, embed_dim), prompt_key_init)
        else:
            self.register_parameter("prompt_key", None)
        self.vote_group = vote_group

    @property
    def vote_group(self) -> object:
        """Where the batch vote counts (docs/behaviour.md §9): None, per rank; a ProcessGroup or ``"world"``:
        the counts are all-reduced (SUM) over that group before the pick. Settable after construction."""
        return self._vote_group

    @vote_group.setter
    def vote_group(self, group: object) -> None:
        validate_vote_group(group)
        self._vote_group = group

    def keys(self) -> Tensor:
        """The keys (M, D): ``prompt_key``, or the mean of each prompt over layers and tokens (prompt-tuning)."""
        key = self.prompt_key
        return key if key is not None else self.prompt.mean(dim=(0, 2))

    def forward(
        self, x_embed: Tensor, prompt_mask: Tensor | None = None, cls_features: Tensor | None = None
    ) -> dict[str, Tensor]:
        """x_embed (B, N, D) → the port's dict (pool mode: ``OUTPUT_ORDER``; non-pool: ``batched_prompt``).

        With ``vote_group`` and the batch vote (no mask), every rank of the group must call forward the same
        number of times; a rank with no rows (B = 0) joins the vote's collective and gets empty outputs."""
        prompt = self.prompt
        global_vote = (
            self._vote_group is not None and self.batchwise_prompt and self.prompt_pool and prompt_mask is None
        )
        validate_forward(
            x_embed, prompt_mask, cls_features, embed_dim=self.embed_dim, pool_size=self.pool_size,
            prompt_pool=self.prompt_pool, device=prompt.device, allow_empty=global_vote,
        )  # fmt: skip
        batch = x_embed.shape[0]
        if not self.prompt_pool:
            if self.use_prefix_tune_for_e_prompt:
                return {"batched_prompt": prompt.unsqueeze(1).expand(-1, batch, -1, -1, -1, -1)}
            return {"batched_prompt": prompt.unsqueeze(1).expand(-1, batch, -1, -1)}
        # an empty share of a global batch (B = 0) still takes part in the collective; the reference runs it
        backend = self.backend if batch > 0 else "reference"
        out = select_prompts(
            x_embed, self.keys(), embedding_key=self.embedding_key, top_k=self.top_k,
            batchwise=self.batchwise_prompt, cls_features=cls_features, prompt_mask=prompt_mask,
            backend=backend, vote_group=self._vote_group if global_vote else None,
        )  # fmt: skip
        out["batched_prompt"] = self.gather(out["prompt_idx"])
        return {key: out[key] for key in OUTPUT_ORDER}

    def gather(self, idx: Tensor) -> Tensor:
        """The selected prompts idx (B, K) of every layer: (L, B, 2, K·Lp, H, Dh) or (L, B, K·Lp, D)."""
        prompt = self.prompt
        layers, batch, k = prompt.shape[0], idx.shape[0], idx.shape[1]
        if self.use_prefix_tune_for_e_prompt:
            flat = prompt.reshape(layers, 2, self.pool_size, -1)
            out = self._prefix_gather(flat, idx, self.layout == "permute")
            return out.view(layers, batch, 2, k * self.length, *prompt.shape[-2:])
        flat = prompt.reshape(layers, 1, self.pool_size, -1)
        return self._prefix_gather(flat, idx, True).view(layers, batch, k * self.length, self.embed_dim)

    def _prefix_gather(self, flat: Tensor, idx: Tensor, batch_first: bool) -> Tensor:
        """``prefix_gather`` of ``self.backend``; an empty share of the global vote (B = 0), which that op
        refuses, takes the reference's indexing."""
        if idx.shape[0] == 0:
            return dispatch.implementation("prefix_gather", "reference", idx.device.type)(flat, idx, batch_first)
        return prefix_gather(flat, idx, batch_first, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"length={self.length}, embed_dim={self.embed_dim}, num_layers={self.num_layers}, "
            f"pool_size={self.pool_size}, top_k={self.top_k}, embedding_key={self.embedding_key!r}, "
            f"prefix={self.use_prefix_tune_for_e_prompt}, num_heads={self.num_heads}, layout={self.layout!r}, "
            f"backend={self.backend!r}"
        )
