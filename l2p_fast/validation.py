"""Argument checks of every op, written once in Python: clear errors raised before any kernel runs.

Each message names the argument, what was expected and what was given. The kernels keep only the
checks that keep memory safe.

**Out-of-range ids** (``prompt_mask``, ``assemble``'s ``idx``): ``check_ids`` raises a ``ValueError``
naming the argument, the range and the bad values, in eager mode on CPU tensors. It is skipped
under ``torch.compile`` (a value check is a host sync inside the graph) and on CUDA tensors (reading
a value back costs a device synchronisation on every call); there every backend clamps the ids to
[0, M − 1] instead (the reference with an explicit clamp, the Triton and C++/CUDA kernels as they
load them), so all backends give the same output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import BACKENDS as _BACKEND_NAMES
from .modes import EMBEDDING_KEYS, QUERY_FROM_CLS, QUERY_MODES

INITS = ("uniform", "zero")
BACKENDS = ("auto", *_BACKEND_NAMES)
QUERY_CODES = tuple(sorted({*QUERY_MODES.values(), QUERY_FROM_CLS}))  # (0, 1, 2, 3)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def validate_config(
    *,
    length: int,
    embed_dim: int,
    embedding_key: str,
    prompt_init: str,
    prompt_pool: bool,
    pool_size: int | None,
    top_k: int | None,
    prompt_key_init: str,
    backend: str,
) -> None:
    """Check the constructor arguments of ``FusedPromptPool`` (docs/behaviour.md §3)."""
    _check_positive_int("length", length)
    _check_positive_int("embed_dim", embed_dim)
    _check_choice("embedding_key", embedding_key, EMBEDDING_KEYS)
    _check_choice("prompt_init", prompt_init, INITS)
    _check_choice("prompt_key_init", prompt_key_init, INITS)
    _check_choice("backend", backend, BACKENDS)
    if not prompt_pool:
        return
    if pool_size is None or top_k is None:
        raise ValueError(
            f"pool_size, top_k: prompt_pool=True needs both, got pool_size={pool_size!r}, top_k={top_k!r}"
        )
    _check_positive_int("pool_size", pool_size)
    _check_positive_int("top_k", top_k)
    if top_k > pool_size:
        raise ValueError(f"top_k: expected 1 <= top_k <= pool_size={pool_size}, got {top_k}")


def validate_vote_group(group: object) -> None:
    """``vote_group`` (docs/behaviour.md §9): None (per-rank vote), ``"world"`` or a torch.distributed ProcessGroup."""
    if group is None or group == "world":
        return
    process_group = getattr(getattr(torch, "distributed", None), "ProcessGroup", None)
    if process_group is None or not isinstance(group, process_group):
        raise ValueError(f"vote_group: expected None, 'world' or a torch.distributed ProcessGroup, got {group!r}")


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def _check_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on the parameters' device {device}, got {t.device}")


def validate_forward(
    x_embed: Tensor,
    prompt_mask: Tensor | None,
    cls_features: Tensor | None,
    *,
    embed_dim: int,
    pool_size: int | None,
    prompt_pool: bool,
    device: torch.device,
    allow_empty: bool = False,
) -> None:
    """Check the forward inputs (docs/behaviour.md §4) against the module's configuration.

    x_embed (B, N, D) float; cls_features (B, D) float or None; prompt_mask (B, K') integer ids
    in [0, M) or None. All on ``device`` (the parameters' device). ``allow_empty``: B = 0 is accepted
    (an empty share of a global batch voting over a group, docs/behaviour.md §9).
    """
    _check_float("x_embed", x_embed)
    if x_embed.dim() != 3:
        raise ValueError(f"x_embed: expected a 3-D tensor (B, N, D), got shape {tuple(x_embed.shape)}")
    batch, _, width = x_embed.shape
    if width != embed_dim:
        raise ValueError(f"x_embed: expected last dim D = embed_dim = {embed_dim}, got {width}")
    if batch < (0 if allow_empty else 1) or x_embed.shape[1] < 1:
        raise ValueError(f"x_embed: expected B >= 1 and N >= 1, got shape {tuple(x_embed.shape)}")
    _check_device("x_embed", x_embed, device)
    if cls_features is not None:
        _check_float("cls_features", cls_features)
        if tuple(cls_features.shape) != (batch, embed_dim):
            raise ValueError(
                f"cls_features: expected shape (B, D) = {(batch, embed_dim)}, got {tuple(cls_features.shape)}"
            )
        _check_device("cls_features", cls_features, device)
    if prompt_mask is not None and prompt_pool:
        _validate_mask(prompt_mask, batch, pool_size, device)


def _validate_mask(prompt_mask: Tensor, batch: int, pool_size: int | None, device: torch.device) -> None:
    if not isinstance(prompt_mask, Tensor):
        raise TypeError(f"prompt_mask: expected a torch.Tensor, got {type(prompt_mask).__name__}")
    if prompt_mask.is_floating_point() or prompt_mask.is_complex() or prompt_mask.dtype == torch.bool:
        raise TypeError(f"prompt_mask: expected an integer tensor of prompt ids, got dtype {prompt_mask.dtype}")
    if prompt_mask.dim() != 2 or prompt_mask.shape[0] != batch or prompt_mask.shape[1] < 1:
        raise ValueError(
            f"prompt_mask: expected shape (B, K') with B = {batch} and K' >= 1, got {tuple(prompt_mask.shape)}"
        )
    _check_device("prompt_mask", prompt_mask, device)
    check_ids("prompt_mask", prompt_mask, "pool_size", pool_size)


def ids_unchecked(ids: Tensor) -> bool:
    """Whether ``check_ids`` skips these ids (under torch.compile, or not on the CPU): clamp them instead."""
    return ids.device.type != "cpu" or torch.compiler.is_compiling()


def check_ids(name: str, ids: Tensor, size_name: str, size: int) -> None:
    """Raise if integer ``ids`` fall outside [0, size): in eager mode, on CPU tensors only (see module doc)."""
    if ids_unchecked(ids) or ids.numel() == 0:
        return
    bounds = torch.aminmax(ids)  # one pass over the ids (the callers checked their shapes)
    low, high = int(bounds.min), int(bounds.max)
    if low < 0 or high >= size:
        raise ValueError(f"{name}: expected ids in [0, {size_name}={size}), got values in [{low}, {high}]")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_pool_op(
    x_embed: Tensor, prompt: Tensor, keys: Tensor, cls_features: Tensor | None, prompt_mask: Tensor | None,
    query_mode: int, top_k: int, frequency: Tensor | None = None, vote_counts: Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices of the fused pool op's arguments (no device sync).

    x_embed (B, N, D), prompt (M, Lp, D), keys (M, D), cls_features (B, D) for query_mode 3,
    prompt_mask (B, K') integer or None, 1 <= top_k <= M without a mask, frequency (M,) float or None,
    vote_counts (M,) integer or None.
    """
    _require(x_embed.dim() == 3, f"x_embed: expected (B, N, D), got shape {tuple(x_embed.shape)}")
    batch, tokens, width = x_embed.shape
    _require(batch >= 1 and tokens >= 1, f"x_embed: expected B >= 1 and N >= 1, got shape {tuple(x_embed.shape)}")
    _require(prompt.dim() == 3 and prompt.shape[2] == width,
             f"prompt: expected (M, Lp, D) with D = {width}, got shape {tuple(prompt.shape)}")
    pool_size = prompt.shape[0]
    _require(tuple(keys.shape) == (pool_size, width),
             f"keys: expected shape {(pool_size, width)}, got {tuple(keys.shape)}")
    _require(query_mode in QUERY_CODES, f"query_mode: expected 0, 1, 2 or 3, got {query_mode}")
    if query_mode == QUERY_FROM_CLS:
        _require(cls_features is not None and tuple(cls_features.shape) == (batch, width),
                 f"cls_features: expected shape {(batch, width)} for query_mode 3, got "
                 f"{None if cls_features is None else tuple(cls_features.shape)}")
    if prompt_mask is None:
        _require(1 <= top_k <= pool_size, f"top_k: expected 1 <= top_k <= M = {pool_size}, got {top_k}")
    else:
        _require(prompt_mask.dim() == 2 and prompt_mask.shape[0] == batch and prompt_mask.shape[1] >= 1,
                 f"prompt_mask: expected shape (B = {batch}, K >= 1), got {tuple(prompt_mask.shape)}")
        _require(not prompt_mask.is_floating_point() and prompt_mask.dtype != torch.bool,
                 f"prompt_mask: expected integer ids, got dtype {prompt_mask.dtype}")
    for name, t in (("x_embed", x_embed), ("prompt", prompt), ("keys", keys), ("cls_features", cls_features)):
        if t is not None:
            _require(t.is_floating_point(), f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    for name, t in (("prompt", prompt), ("keys", keys), ("cls_features", cls_features), ("prompt_mask", prompt_mask)):
        if t is not None:
            _require(t.device == x_embed.device, f"{name}: expected device {x_embed.device}, got {t.device}")
    _check_selection_inputs(frequency, vote_counts, pool_size, x_embed.device)


def _check_selection_inputs(
    frequency: Tensor | None, vote_counts: Tensor | None, pool_size: int, device: torch.device
) -> None:
    """frequency (M,) float and vote_counts (M,) integer on ``device``, when given (shapes, dtypes, devices)."""
    if frequency is not None:
        if not isinstance(frequency, Tensor) or not frequency.is_floating_point():
            got = getattr(frequency, "dtype", frequency)
            raise TypeError(f"frequency: expected a floating-point tensor, got {got!r}")
        _require(tuple(frequency.shape) == (pool_size,),
                 f"frequency: expected shape (M,) = ({pool_size},), got {tuple(frequency.shape)}")
        _require(frequency.device == device, f"frequency: expected device {device}, got {frequency.device}")
    if vote_counts is not None:
        integer = isinstance(vote_counts, Tensor) and not (
            vote_counts.is_floating_point() or vote_counts.is_complex() or vote_counts.dtype == torch.bool
        )
        if not integer:
            got = getattr(vote_counts, "dtype", vote_counts)
            raise TypeError(f"vote_counts: expected an integer tensor, got {got!r}")
        _require(tuple(vote_counts.shape) == (pool_size,),
                 f"vote_counts: expected shape (M,) = ({pool_size},), got {tuple(vote_counts.shape)}")
        _require(vote_counts.device == device, f"vote_counts: expected device {device}, got {vote_counts.device}")


def validate_frequency(frequency: Tensor, pool_size: int | None, device: torch.device) -> None:
    """The pool's ``prompt_frequency`` (docs/behaviour.md §8): a float (M,) tensor on ``device`` with finite values
    >= 0. The values are checked in eager mode on CPU tensors only (as ``check_ids``: elsewhere a value check
    would synchronise); elsewhere a negative or non-finite entry gives a selection this page leaves open."""
    if pool_size is None:
        raise ValueError("prompt_frequency: expected None in non-pool mode (prompt_pool=False), got a tensor")
    _check_selection_inputs(frequency, None, pool_size, device)
    if ids_unchecked(frequency):
        return
    bad = ~torch.isfinite(frequency) | (frequency < 0)
    if bool(bad.any()):
        raise ValueError(
            f"prompt_frequency: expected finite values >= 0, got {frequency[bad][:4].tolist()} at ids "
            f"{bad.nonzero().flatten()[:4].tolist()}"
        )


def validate_prepend_op(prompt: Tensor, x_embed: Tensor) -> None:
    """Non-pool prepend: prompt (Lp, D) and x_embed (B, N, D) on one device."""
    _require(x_embed.dim() == 3, f"x_embed: expected (B, N, D), got shape {tuple(x_embed.shape)}")
    _require(prompt.dim() == 2 and prompt.shape[1] == x_embed.shape[2],
             f"prompt: expected (Lp, D) with D = {x_embed.shape[2]}, got shape {tuple(prompt.shape)}")
    _require(prompt.device == x_embed.device, f"prompt: expected device {x_embed.device}, got {prompt.device}")


def validate_assembly(x: Tensor, prompt: Tensor, idx: Tensor, cls: Tensor, pos: Tensor | None) -> None:
    """``assemble``'s inputs: x (B, N, D), prompt (M, Lp, D), idx (B, K) int64 ids in [0, M) (``check_ids``),
    cls (1 | B, 1, D), pos (1, 1 + K·Lp + N, D) or None; float tensors on x's device."""
    for name, t in (("x", x), ("prompt", prompt), ("cls", cls)) + ((("pos", pos),) if pos is not None else ()):
        _check_float(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D tensor, got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
    batch, tokens, width = x.shape
    if batch < 1:
        raise ValueError(f"x: expected B >= 1, got shape {tuple(x.shape)}")
    if prompt.shape[0] < 1 or prompt.shape[1] < 1 or prompt.shape[2] != width:
        raise ValueError(f"prompt: expected (M, Lp, D) with M, Lp >= 1 and D = {width}, got {tuple(prompt.shape)}")
    if not isinstance(idx, Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"idx: expected an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.dim() != 2 or idx.shape[0] != batch or idx.shape[1] < 1 or idx.device != x.device:
        raise ValueError(
            f"idx: expected (B, K) with B = {batch}, K >= 1 on {x.device}, got {tuple(idx.shape)} on {idx.device}"
        )
    if cls.shape[0] not in (1, batch) or cls.shape[1] != 1 or cls.shape[2] != width:
        raise ValueError(f"cls: expected (1, 1, {width}) or ({batch}, 1, {width}), got {tuple(cls.shape)}")
    seq_len = 1 + idx.shape[1] * prompt.shape[1] + tokens
    if pos is not None and tuple(pos.shape) != (1, seq_len, width):
        raise ValueError(f"pos: expected (1, 1 + K·Lp + N, D) = {(1, seq_len, width)}, got {tuple(pos.shape)}")
    check_ids("idx", idx, "M", prompt.shape[0])
