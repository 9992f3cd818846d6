"""``FusedPromptPool``: drop-in for the ``Prompt`` module of JH-LEE-KR/l2p-pytorch (docs/behaviour.md §3–4, §6)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import dispatch
from .validation import validate_config, validate_forward, validate_frequency, validate_vote_group

OUTPUT_ORDER = (
    "prompt_idx",
    "prompt_norm",
    "x_embed_norm",
    "similarity",
    "selected_key",
    "reduce_sim",
    "total_prompt_len",
    "prompted_embedding",
)


def _init_parameter(shape: tuple[int, ...], init: str) -> nn.Parameter:
    """'zero' → zeros; 'uniform' → U(-1, 1).

    For 'uniform' a normal draw precedes the uniform one, as in the port, so that a seeded run
    consumes the random stream the same way and produces the same initial values.
    """
    if init == "zero":
        return nn.Parameter(torch.zeros(shape))
    value = torch.randn(shape)
    nn.init.uniform_(value, -1.0, 1.0)
    return nn.Parameter(value)


def global_vote_counts(
    x_embed: Tensor,
    keys: Tensor,
    *,
    embedding_key: str,
    top_k: int,
    cls_features: Tensor | None,
    frequency: Tensor | None,
    backend: str,
    group: object,
) -> Tensor:
    """The global batch vote's counts (docs/behaviour.md §9): the counts (M,) int64 of this rank's rows x_embed
    (B, N, D) (B = 0 allowed) against keys (M, D), all-reduced (SUM) over ``group`` ("world" or a ProcessGroup).

    One op before the collective (``pool_vote_counts`` of ``backend``), then a functional collective (traceable,
    no host sync). Handed to ``pool_forward`` as ``vote_counts``; shared by the L2P pool and DualPrompt's E-prompt.
    """
    from torch.distributed import _functional_collectives as funcol

    counts = dispatch.implementation("pool_vote_counts", backend, x_embed.device.type)(
        x_embed, keys, embedding_key=embedding_key, top_k=top_k, cls_features=cls_features, frequency=frequency,
    )  # fmt: skip
    process_group = torch.distributed.group.WORLD if isinstance(group, str) else group
    # waited here (a stream wait on GPUs, no host sync): the next op needs the counts at once, and handing it
    # the still-async result instead costs a Python subclass dispatch of the whole fused op
    return funcol.wait_tensor(funcol.all_reduce(counts, "sum", process_group))


class FusedPromptPool(nn.Module):
    """A pool of M prompts (M, Lp, D) with keys (M, D), selected per input by cosine similarity.

    Same constructor, ``forward`` and output dict as the port's ``Prompt``; ``backend`` picks the
    implementation ('auto', 'reference', 'triton', 'cpu', 'cuda'; see ``l2p_fast.dispatch``).
    Differences from the port (its bugs, docs/behaviour.md §6): the default constructor works; non-pool mode owns
    one learnable (Lp, D) prompt; with ``prompt_key=False`` the keys are the mean of the current
    prompts, recomputed each call (differentiable), and ``prompt_key`` is a ``None`` parameter slot.

    Where the backends' autograd differs (forward-mode AD, in-place edits between forward and backward,
    zero vs ``None`` gradients of unreached inputs) is documented in ``l2p_fast/ops/pool.py``. Prompt
    ids out of range raise in eager mode on CPU tensors and are clamped to [0, M − 1] elsewhere
    (``l2p_fast/validation.py``).

    Additions beyond the port (docs/behaviour.md §8–10): ``prompt_frequency`` (a non-persistent (M,)
    buffer, None by default) diversifies the selection in training mode (the L2P paper's equation 4);
    ``vote_group`` (None: per-rank vote; a ``torch.distributed`` ProcessGroup or ``"world"``) all-reduces
    the batch vote's counts so every rank picks the global batch's prompts; ``share_previous_task``
    copies the previous task's prompt slots (and keys) into the next task's.
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
        *,
        backend: str = "auto",
        vote_group: object = None,
    ) -> None:
        super().__init__()
        validate_config(
            length=length,
            embed_dim=embed_dim,
            embedding_key=embedding_key,
            prompt_init=prompt_init,
            prompt_pool=prompt_pool,
            pool_size=pool_size,
            top_k=top_k,
            prompt_key_init=prompt_key_init,
            backend=backend,
        )
        self.length = length
        self.embed_dim = embed_dim
        self.prompt_pool = prompt_pool
        self.embedding_key = embedding_key
        self.prompt_init = prompt_init
        self.prompt_key_init = prompt_key_init
        self.pool_size = pool_size
        self.top_k = top_k
        self.batchwise_prompt = batchwise_prompt
        self.learnable_key = prompt_key
        self.backend = backend
        shape = (pool_size, length, embed_dim) if prompt_pool else (length, embed_dim)
        self.prompt = _init_parameter(shape, prompt_init)
        if prompt_key and pool_size is not None:
            self.prompt_key = _init_parameter((pool_size, embed_dim), prompt_key_init)
        else:
            self.register_parameter("prompt_key", None)
        self.register_buffer("prompt_frequency", None, persistent=False)  # (M,): §8, training mode only
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

    def set_prompt_frequency(self, frequency: Tensor | None) -> None:
        """Selection frequencies (M,) of the previous tasks, or None (docs/behaviour.md §8): in training mode the
        selection minimises the query–key cosine distance weighted by them (only their ratios matter)."""
        if frequency is not None:
            validate_frequency(frequency, self.pool_size if self.prompt_pool else None, self.prompt.device)
            frequency = frequency.detach().to(torch.float32)
        self.prompt_frequency = frequency

    @torch.no_grad()
    def share_previous_task(self, task: int, *, prompts: bool = True, keys: bool = False) -> None:
        """The port's ``shared_prompt_pool`` / ``shared_prompt_key`` (docs/behaviour.md §10): copy the prompt slots
        (and / or the keys) of task ``task`` − 1, ids (t−1)·K … t·K−1, into those of task t, t·K … (t+1)·K−1.

        A no-op for task 0, outside pool mode and where task t's slots pass M (as the task mask then
        gives way to selection). ``keys`` needs learnable keys (``prompt_key=True``)."""
        if not isinstance(task, int) or isinstance(task, bool) or task < 0:
            raise ValueError(f"task: expected an int >= 0, got {task!r}")
        if keys and self.prompt_key is None:
            raise ValueError("keys: expected prompt_key=True (learnable keys) to share keys, got prompt_key=False")
        if task == 0 or not self.prompt_pool or (task + 1) * self.top_k > self.pool_size:
            return
        k = self.top_k
        previous, current = slice((task - 1) * k, task * k), slice(task * k, (task + 1) * k)
        if prompts:
            self.prompt[current] = self.prompt[previous]
        if keys:
            self.prompt_key[current] = self.prompt_key[previous]

    def keys(self) -> Tensor:
        """The keys (M, D): the learnable ``prompt_key``, or the mean of each prompt's Lp tokens."""
        key = self.prompt_key  # one lookup: parameters are reached through nn.Module.__getattr__
        return key if key is not None else self.prompt.mean(dim=1)

    def resolved_backend(self, device: torch.device | str) -> str:
        """Name of the backend that runs for tensors on ``device``."""
        op = "pool_forward" if self.prompt_pool else "prepend"
        return dispatch.resolve(op, self.backend, torch.device(device).type)

    def forward(
        self, x_embed: Tensor, prompt_mask: Tensor | None = None, cls_features: Tensor | None = None
    ) -> dict[str, Tensor | int]:
        """x_embed (B, N, D) → dict of docs/behaviour.md §4.5; ``prompted_embedding`` is (B, K·Lp + N, D).

        In training mode ``prompt_frequency`` (when set) diversifies the selection (§8); with ``vote_group``
        and the batch vote, the counts are all-reduced before the pick (§9): every rank of the group must
        then call forward the same number of times with the same batchwise / mask setting."""
        prompt = self.prompt  # each parameter read once: nn.Module.__getattr__ costs ~1 µs a lookup
        global_vote = (
            self._vote_group is not None and self.batchwise_prompt and self.prompt_pool and prompt_mask is None
        )
        validate_forward(
            x_embed,
            prompt_mask,
            cls_features,
            embed_dim=self.embed_dim,
            pool_size=self.pool_size,
            prompt_pool=self.prompt_pool,
            device=prompt.device,
            allow_empty=global_vote,
        )
        if not self.prompt_pool:
            prepend = dispatch.implementation("prepend", self.backend, x_embed.device.type)
            return {"total_prompt_len": self.length, "prompted_embedding": prepend(prompt, x_embed)}
        keys = self.keys()
        frequency = self.prompt_frequency if self.training and prompt_mask is None else None
        selection = {} if frequency is None else {"frequency": frequency}
        # an empty share of a global batch (B = 0) still takes part in the collective; the reference runs it
        backend = self.backend if x_embed.shape[0] > 0 else "reference"
        if global_vote:
            selection["vote_counts"] = global_vote_counts(
                x_embed, keys, embedding_key=self.embedding_key, top_k=self.top_k, cls_features=cls_features,
                frequency=frequency, backend=backend, group=self._vote_group,
            )  # fmt: skip
        out = dispatch.implementation("pool_forward", backend, x_embed.device.type)(
            x_embed,
            prompt,
            keys,
            embedding_key=self.embedding_key,
            top_k=self.top_k,
            batchwise=self.batchwise_prompt,
            cls_features=cls_features,
            prompt_mask=prompt_mask,
            **selection,
        )
        out["total_prompt_len"] = out["prompt_idx"].shape[1] * self.length
        return {key: out[key] for key in OUTPUT_ORDER}

    def extra_repr(self) -> str:
        return (
            f"length={self.length}, embed_dim={self.embed_dim}, prompt_pool={self.prompt_pool}, "
            f"pool_size={self.pool_size}, top_k={self.top_k}, embedding_key={self.embedding_key!r}, "
            f"batchwise_prompt={self.batchwise_prompt}, prompt_key={self.learnable_key}, backend={self.backend!r}"
        )
