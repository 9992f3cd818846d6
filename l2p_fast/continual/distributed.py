"""Training on several processes with ``torch.distributed``: the process group, data shards, exact reductions.

One process is the special case of the same code: with no process group (or a group of one) every
helper here is the identity, so the trainer has a single code path. Under ``torchrun`` the command
line calls :func:`session`, which reads the launcher's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), starts the default group (NCCL when the run's
device is a GPU, gloo on the CPU) with a collective timeout, and ends it afterwards.

The rules the trainer follows (docs/design/distributed.md):

* every rank forms the same *global* batches (seeded orders, replay draws, augmentation seeds) and
  keeps the contiguous shard :func:`shard` gives it, so N processes see the examples of one;
* the gradients of the trainable parameters are summed over the ranks (:func:`all_reduce_grads`)
  after each rank weighted its mean loss by its share of the global batch, so every rank applies
  the one-process gradient (up to summation order) and keeps identical parameters and optimiser state;
* counts are summed as integers (exact); rank 0 writes files; a decision that reads the file system
  is taken on rank 0 and shared (:func:`from_main`), so no rank goes its own way;
* a failed collective (a rank died, or did not answer within the timeout) raises :class:`RankError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
TIMEOUT_ENV = "L2P_FAST_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0  # a collective waits this long for a silent rank before the run fails
BUCKET_ELEMENTS = 1 << 22  # gradients are summed in flat buffers of at most this many elements (16 MiB fp32)
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_started: dict[str, float] = {}  # the timeout the group of :func:`init` was started with


class RankError(RuntimeError):
    """A collective with the other processes failed: one of them died, failed, or did not answer in time."""


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{name}: the launcher (torchrun) sets this environment variable; it is missing")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment, got {value!r}") from None


def launched() -> bool:
    """Whether this process was started by a multi-process launcher (``WORLD_SIZE`` > 1 in the environment)."""
    return _env_int("WORLD_SIZE", 1) > 1


def timeout_seconds() -> float:
    """The collective timeout: the one the running group was started with by :func:`init`, else
    ``$L2P_FAST_COLLECTIVE_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT_S`."""
    if "timeout" in _started and dist.is_available() and dist.is_initialized():
        return _started["timeout"]
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}: expected a finite number of seconds > 0, got {value!r}")
    return seconds


def backend_for(device: torch.device | str) -> str:
    """The collective backend of a run on ``device``: 'nccl' for CUDA, 'gloo' otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: torch.device | str, *, init_method: str = "env://", world_size: int | None = None,
         rank: int | None = None, timeout: float | None = None) -> None:
    """Start the default process group for a run on ``device`` ('cuda' binds this process to GPU ``LOCAL_RANK``).

    ``init_method``, ``world_size``, ``rank``: as ``torch.distributed.init_process_group`` (the default reads
    the launcher's environment). ``timeout``: seconds a collective waits (default :func:`timeout_seconds`).
    """
    if dist.is_initialized():
        raise RuntimeError("distributed: a process group is already initialised in this process")
    device = torch.device(device)
    if device.type == "cuda":
        local = _env_int("LOCAL_RANK", 0)
        if not 0 <= local < torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK: expected a GPU index in [0, {torch.cuda.device_count()}), got {local}")
        torch.cuda.set_device(local)
    seconds = timeout_seconds() if timeout is None else timeout
    options: dict[str, Any] = {"init_method": init_method, "timeout": timedelta(seconds=seconds)}
    if world_size is not None:
        options.update(world_size=world_size, rank=rank)
    dist.init_process_group(backend_for(device), **options)
    _started["timeout"] = seconds


@contextlib.contextmanager
def session(device: torch.device | str) -> Iterator[None]:
    """Inside the block, the default process group of a launched run (see :func:`launched`); a no-op otherwise
    or when a group exists already. The group this call started is destroyed at the end. Processes other than
    rank 0 log warnings and errors only."""
    started = launched() and dist.is_available() and not dist.is_initialized()
    if started:
        missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
        if missing:
            raise ValueError(f"distributed: WORLD_SIZE > 1 but the launcher's variables {missing} are missing; "
                             "start the run with torchrun")
        init(device)
        if not is_main():  # one run, one log: the other processes report warnings and errors only
            logging.getLogger("l2p_fast").setLevel(logging.WARNING)
    broken = False
    try:
        yield
    except RankError:
        broken = True  # a peer is gone: tearing the group down can block or abort inside gloo, so it is left alone
        raise
    finally:
        if started and dist.is_initialized() and not broken:
            dist.destroy_process_group()


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the run (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0)."""
    return rank() == 0


def describe() -> str:
    """One line for the run's log: the world size and the collective backend."""
    if not active():
        return "1 process"
    backend = dist.get_backend()
    return f"{world_size()} processes (rank {rank()}, {backend} collectives, timeout {timeout_seconds():g} s)"


def shard_bounds(size: int, world: int, index: int) -> tuple[int, int]:
    """[start, end) of rank ``index``'s contiguous part of ``size`` items: sizes differ by at most one, the
    first ``size mod world`` ranks hold one more (a rank holds none when ``size < world``)."""
    if world < 1 or not 0 <= index < world:
        raise ValueError(f"index: expected a rank in [0, {world}), got {index}")
    base, extra = divmod(size, world)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def shard(items: Tensor) -> tuple[Tensor, int]:
    """This rank's contiguous part of a global batch ``items`` (B,) and the position of its first item."""
    start, end = shard_bounds(len(items), world_size(), rank())
    return items[start:end], start


@contextlib.contextmanager
def collective_errors(what: str) -> Iterator[None]:
    """Turn a failed collective inside the block into a :class:`RankError` naming ``what`` was being done."""
    try:
        yield
    except RankError:
        raise
    except (dist.DistError, RuntimeError) as error:
        if not active() or not _is_collective_failure(error):
            raise
        first = " ".join(str(error).split())[:300]
        raise RankError(
            f"distributed: rank {rank()} of {world_size()} lost the other processes while {what} ({first}). One of "
            f"them died or did not answer within {timeout_seconds():g} s; the run stops. Run the same command with "
            "--resume to continue from the last checkpoint"
        ) from error


def _is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def all_reduce_(tensor: Tensor, what: str = "summing counts") -> Tensor:
    """Sum ``tensor`` over the ranks, in place (identity for one process); integer sums are exact."""
    if active():
        with collective_errors(what):
            dist.all_reduce(tensor)
    return tensor


def all_reduce_grads(params: Sequence[torch.nn.Parameter], extra: Tensor | None = None) -> Tensor | None:
    """Sum the gradients of ``params`` over the ranks, in place; ``extra`` (a few numbers, e.g. the weighted
    loss and prompt counts) is summed too and returned (on its own device).

    A parameter without a gradient on some ranks gets the sum of the others'; one without a gradient on
    every rank keeps ``None`` (so the optimiser skips it, as in one process). The sums travel in flat
    buffers of at most :data:`BUCKET_ELEMENTS` elements per dtype and device. Identity for one process."""
    if not active():
        return extra
    params = list(params)
    if not params:
        raise ValueError("params: expected the trainable parameters, got none")
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=device)
    head = has if extra is None else torch.cat([has, extra.to(device=device, dtype=torch.float64).reshape(-1)])
    with collective_errors("summing gradients"):
        dist.all_reduce(head)
        present = [p for p, n in zip(params, head[: len(params)].tolist(), strict=True) if n > 0]
        for p in present:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for grads in _buckets([p.grad for p in present]):
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
    if extra is None:
        return None
    return head[len(params):].to(device=extra.device, dtype=extra.dtype).view_as(extra)


def _buckets(grads: list[Tensor]) -> list[list[Tensor]]:
    """``grads`` in order, cut into runs of one dtype and device of at most :data:`BUCKET_ELEMENTS` elements."""
    buckets: list[list[Tensor]] = []
    size = 0
    for g in grads:
        if not buckets or size + g.numel() > BUCKET_ELEMENTS or buckets[-1][0].dtype != g.dtype \
                or buckets[-1][0].device != g.device:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel()
    return buckets


def from_main(fn: Callable[[], T], what: str = "sharing rank 0's decision") -> T:
    """``fn()`` run on rank 0 only, its result (or the exception it raised) given to every rank.

    For decisions that read the file system (an earlier run in the output folder, a checkpoint to resume):
    every rank then takes the same branch, and a refusal is raised on every rank, not on rank 0 alone.
    The result travels pickled; identity (``fn()``) for one process."""
    if not active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("error", error)
        try:
            pickle.dumps(box[0])
        except Exception as error:  # noqa: BLE001
            box[0] = ("error", RuntimeError(f"distributed: cannot send rank 0's result to the others ({error})"))
    with collective_errors(what):
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def barrier(what: str = "waiting for the other processes") -> None:
    """Wait until every rank reaches this point (no-op for one process)."""
    if active():
        with collective_errors(what):
            dist.barrier()


def use_global_vote(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Make every batch-voting prompt pool in ``model`` (L2P's ``FusedPromptPool``, DualPrompt's ``FusedEPrompt``)
    vote over the global batch of all processes: sets its ``vote_group`` to the default group. Returns the pools
    set; raises when a pool votes per batch but cannot vote globally (a run on several processes would then be
    another method)."""
    voting = [m for m in model.modules()  # the pools: their prompts are a parameter (the models hold the pool)
              if getattr(m, "batchwise_prompt", False) is True
              and isinstance(getattr(m, "prompt", None), torch.nn.Parameter)]
    lacking = [type(m).__name__ for m in voting if not hasattr(m, "vote_group")]
    if lacking:
        raise RuntimeError(
            f"batchwise_prompt: on {world_size()} processes the prompt vote must count the global batch, but "
            f"{sorted(set(lacking))} has no vote_group; run on one process or without --batchwise-prompt"
        )
    for module in voting:
        module.vote_group = dist.group.WORLD
    return voting


def join_vote(pools: Sequence[torch.nn.Module], mask_task: int | None = None) -> None:
    """A process whose share of a global batch is empty takes part in the global vote all the same: each pool
    of ``pools`` (from :func:`use_global_vote`) runs on zero rows, adding zero counts (docs/behaviour.md §9).

    ``mask_task``: the task id when the model's forward passes its task's prompt mask (L2P's
    ``use_prompt_mask`` in training); a pool given a mask does not vote, so there is nothing to join."""
    from ..models.common import task_prompt_mask

    with torch.no_grad():
        for pool in pools:
            prompt = pool.prompt
            if mask_task is not None and task_prompt_mask(mask_task, pool.top_k, pool.pool_size, 0,
                                                          prompt.device) is not None:
                continue
            width = pool.embed_dim  # not the prompt's last dim: the E-prompt's prefix prompts end in Dh
            pool(prompt.new_zeros(0, 1, width), cls_features=prompt.new_zeros(0, width))
