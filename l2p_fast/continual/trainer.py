"""The training loop of one continual-learning run: tasks in order, evaluation, checkpoints, resume.

For each task: a fresh Adam (β = 0.9, 0.999; per-task reset), ``epochs`` passes over the task's
training data in a seeded order, logits masked to the allowed classes for the loss (``train_mask``),
the method's extra terms (pull constraint, EWC penalty), gradient clipping. Then the method's
end-of-task hook (replay buffer, Fisher) and an evaluation on the test sets of every task seen so
far, all seen classes competing (docs/behaviour.md §5, §7). ``joint`` is one phase over all tasks' data.

A checkpoint is written every ``checkpoint_every`` steps and after every task; ``resume=True``
continues from it and ends with exactly the numbers an uninterrupted run gives: batch orders and
replay draws come from generators seeded by (seed, task, epoch, step), and the optimiser, method
state and global RNG state are restored. A checkpoint is verified and checked against the run's
plan before use (:mod:`.checkpoint`).

Guards, all off the arithmetic of a normal run: the output folder is locked for the run's lifetime
and refused when it holds an earlier run without ``resume`` (:mod:`.output`); the backend and the
inputs' shape are checked before any training; and the first non-finite loss or gradient norm stops
the run with :class:`NonFiniteLossError` before the optimiser step, so parameters and the checkpoint
on disk keep the last finite state; non-finite logits in an evaluation stop it too (one check per
evaluation batch). That check reads the loss value the progress bar shows anyway
(one host sync per step, which the methods' logged loss parts already cost) and the gradient norm
that clipping computes (without clipping, one extra norm over the gradients).

Several processes (``torchrun``; :mod:`.distributed`): the same loop. Every process forms the same
global batches (``batch_size`` is the global batch; ``lr`` applies to it, unscaled), keeps its shard,
weights its mean loss by its share of the batch, and the trainable gradients are summed over the
processes before clipping, so every process takes the one-process step. Evaluation batches are
sharded the same way and the counts summed exactly; rank 0 writes checkpoints and results, and
every process resumes from the checkpoint rank 0 read.

Speed options: ``precision`` (every forward under ``models.precision.autocast``; fp16 with a loss scaler
whose state is checkpointed; 'auto' resolved here and recorded), ``compile`` (``torch.compile`` of the
model's forward) and ``num_workers`` (image batches loaded ahead by worker processes, each item's
augmentation seeded by its step, so the numbers do not depend on the workers; :mod:`.loading`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.precision import autocast, grad_scaler, resolve_precision
from . import distributed, metrics
from .backbones import Backbone, load_backbone
from .batching import Pool, build_pool, derive_seed, eval_batches, generator, train_batches
from .benchmarks import ContinualBenchmark, get_benchmark
from .benchmarks.validation import validation_split
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_run_state,
    load_checkpoint,
    restore_optimizer,
    restore_scaler,
    save_checkpoint,
)
from .config import RunConfig, resolve
from .diagnostics import selection_diagnostics
from .features import cached_features
from .loading import item_seeds, load_batches
from .methods import Method, TaskEnd, make_method
from .output import OutputError, ensure_writable_dir, refuse_earlier_run, run_lock, write_json
from .preflight import check_backend, check_inputs, pick_device

log = logging.getLogger(__name__)
RESULTS_NAME = "results.json"
StepHook = Callable[[int], None]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; raised before the optimiser step applies it."""


@dataclass(frozen=True)
class Phase:
    """One training phase: the tasks whose data it trains on, the prompt task id, the tasks evaluated after it."""

    task_id: int
    train_tasks: tuple[int, ...]
    eval_tasks: tuple[int, ...]


def phases_of(method: str, num_tasks: int) -> list[Phase]:
    """One phase per task, or a single phase over all tasks for ``joint``."""
    if method == "joint":
        every = tuple(range(num_tasks))
        return [Phase(-1, every, every)]
    return [Phase(t, (t,), tuple(range(t + 1))) for t in range(num_tasks)]


def load_run_benchmark(config: RunConfig) -> ContinualBenchmark:
    """The benchmark of a resolved config, with its options (data path, subset sizes, class order); with
    ``validation_fraction`` its validation split (held out of the training data, in place of the test set)."""
    options: dict[str, Any] = {}
    if config.classes_per_task is not None:
        options["classes_per_task"] = config.classes_per_task
    if config.class_order_seed is not None:
        options["seed"] = config.class_order_seed
    name = config.benchmark
    if name == "wordnet20":
        options.update(train_per_class=config.train_per_class, test_per_class=config.test_per_class)
        if config.data:
            options["path"] = config.data
    elif name in ("tensor_file", "image_folder"):
        options["path" if name == "tensor_file" else "root"] = config.data
        if name == "image_folder":
            options["image_size"] = config.image_size
        options.setdefault("classes_per_task", 2)
    else:  # torchvision benchmarks
        options.update(root=config.data or "data", download=config.download, image_size=config.image_size)
    benchmark = get_benchmark(name, **options)
    return validation_split(benchmark, config.validation_fraction) if config.validation_fraction else benchmark


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms inside the block (restored after)."""
    previous = torch.are_deterministic_algorithms_enabled()
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def class_mask(kind: str, benchmark: ContinualBenchmark, tasks: tuple[int, ...], device: torch.device) -> Tensor:
    """Bool (C,) of the classes allowed in the loss: the phase's ('task'), all seen ('seen') or all ('all')."""
    mask = torch.zeros(benchmark.num_classes, dtype=torch.bool, device=device)
    if kind == "all":
        mask[:] = True
    elif kind == "seen":
        mask[: benchmark.num_seen_classes(max(tasks))] = True
    else:
        for t in tasks:
            mask[benchmark.task_labels(t)] = True
    return mask


class Trainer:
    """Runs one method on one benchmark and writes ``results.json`` (see :meth:`run`).

    ``backbone``: a loaded :class:`Backbone` to use instead of loading ``config.backbone`` (tests,
    or :func:`compare` sharing one load). ``step_hook(global_step)`` runs after every optimiser step
    (tests inject interruptions with it). ``cache_dir`` holds cached text features (default
    ``output/cache``).
    """

    def __init__(
        self,
        config: RunConfig,
        output: str | Path,
        *,
        resume: bool = False,
        backbone: Backbone | None = None,
        step_hook: StepHook | None = None,
        cache_dir: str | Path | None = None,
        benchmark: ContinualBenchmark | None = None,
    ) -> None:
        self.config = resolve(config)
        self.device = pick_device(self.config.device)
        check_backend(self.config, self.device)
        self.requested_precision = self.config.precision
        # 'auto' becomes this machine's choice before anything reads the config (fingerprint, results)
        self.config = replace(self.config, precision=resolve_precision(self.config.precision, self.device))
        self.output = ensure_writable_dir(output, "output")
        self.resume = resume
        self.step_hook = step_hook
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.output / "cache"
        self._backbone = backbone
        self._benchmark = benchmark
        with contextlib.ExitStack() as stack:  # a folder in use is reported as such, before its files are judged
            self._hold_folder(stack)

    def _hold_folder(self, stack: contextlib.ExitStack) -> None:
        """Lock the output folder (until ``stack`` closes) and check it: on rank 0, every process gets the verdict."""
        stack.enter_context(run_lock(self.output))
        distributed.from_main(self._check_folder, "checking the output folder")

    def _check_folder(self) -> None:
        refuse_earlier_run(self.output, self.resume)
        if self.resume and (self.output / RESULTS_NAME).exists() and not (self.output / CHECKPOINT_NAME).exists():
            raise OutputError(
                f"output: {self.output} holds the results of a finished run but no {CHECKPOINT_NAME} to resume "
                "from; choose another --output, or delete its results.json to train again"
            )

    # -- set-up -------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        self.benchmark = self._benchmark if self._benchmark is not None else load_run_benchmark(cfg)
        kind = "text" if self.benchmark.modality == "text" else "vision"
        if self._backbone is None:
            self._backbone = load_backbone(kind, cfg.backbone, cfg.pretrained, cfg.image_size)
        if self._backbone.kind != kind:
            raise ValueError(
                f"backbone: benchmark {cfg.benchmark!r} needs a {kind} backbone, got a {self._backbone.kind} one"
            )
        self.backbone = self._backbone
        check_inputs(self.benchmark, self.backbone)
        self.backbone_fingerprint = self.backbone.fingerprint()
        self.train_pool = build_pool(self.benchmark, "train", self.backbone.tokenizer, cfg.max_length)
        self.test_pool = build_pool(self.benchmark, "test", self.backbone.tokenizer, cfg.max_length)
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        self.method: Method = make_method(cfg, self.backbone, self.benchmark.num_classes, self.benchmark.num_tasks)
        self.method.model.to(self.device)
        # the batch vote counts the global batch, as one process would
        self.voting_pools = distributed.use_global_vote(self.method.model) if (
            cfg.batchwise_prompt and distributed.active()) else []
        if cfg.compile:  # the instance's forward, so state-dict keys and checkpoints are unchanged
            self.method.model.forward = torch.compile(self.method.model.forward)
        log.info("%s on %s: precision %s (requested %s), compile %s, backend %s", cfg.method, self.device,
                 cfg.precision, self.requested_precision, "on" if cfg.compile else "off", cfg.backend)
        log.info("%s: %s; global batch %d (--batch-size, split over the processes), lr %g for that global batch "
                 "(not scaled with the number of processes)", cfg.method, distributed.describe(), cfg.batch_size,
                 cfg.lr)
        self.phases = phases_of(cfg.method, self.benchmark.num_tasks)
        self.train_cache = self.test_cache = None
        if self.method.uses_feature_cache:
            self.train_cache = self._features(self.train_pool)
            self.test_cache = self._features(self.test_pool)

    def _features(self, pool: Pool) -> Tensor:
        return cached_features(
            self.backbone, pool, self.cache_dir, self.backbone_fingerprint, self.config.eval_batch_size,
            self.device, progress=self.config.progress,
        ).to(self.device)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.method.trainable_parameters(), lr=self.config.lr, betas=(0.9, 0.999))

    # -- one batch ----------------------------------------------------------------------------------------------
    def _forward(self, indices: Tensor, task_id: int, train: bool, pool: Pool, cache: Tensor | None,
                 inputs: Any = None) -> dict[str, Any]:
        """The method's output on pool items ``indices``; ``inputs``: their collated inputs when already loaded."""
        if inputs is None and self.method.needs_inputs:
            inputs = pool.collate(indices, self.device)
        cached = cache[indices.to(cache.device)] if cache is not None else None
        with autocast(self.config.precision, self.device):
            return self.method.forward(inputs, cached, task_id, train)

    def _inputs(self, pool: Pool, batches: list[Tensor], seeds: list[Tensor | None]) -> Iterator[Any]:
        """The collated inputs of ``batches`` (loaded ahead by ``num_workers`` workers), or None each when the
        method runs on cached features alone."""
        if not self.method.needs_inputs:
            return iter([None] * len(batches))
        return load_batches(pool, batches, seeds, self.device, self.config.num_workers)

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train every phase (resuming from the checkpoint when asked), evaluate, write and return the results."""
        threads = torch.get_num_threads()
        try:
            if self.config.num_threads is not None:
                torch.set_num_threads(self.config.num_threads)
            with contextlib.ExitStack() as stack, deterministic(self.device):
                self._hold_folder(stack)
                with distributed.collective_errors("training"):
                    return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.config
        started = time.perf_counter()
        self._setup()
        num_tasks = self.benchmark.num_tasks
        rows: list[list[float]] = []
        counts_train = torch.zeros(num_tasks, cfg.pool_size, dtype=torch.long)
        counts_test = torch.zeros(num_tasks, cfg.pool_size, dtype=torch.long)
        reduce_sim = torch.zeros(len(self.phases), cfg.epochs, 2, dtype=torch.float64)  # per epoch: sum, steps
        position = {"phase": 0, "epoch": 0, "step": 0, "global_step": 0}
        elapsed = {"train": 0.0, "eval": 0.0, "setup": 0.0, "examples": 0}
        optimizer_state = None
        scaler = grad_scaler(cfg.precision, self.device)  # fp16: loss scaling; otherwise a no-op
        checkpoint_path = self.output / CHECKPOINT_NAME
        sizes = [len(self.train_pool.task_indices(list(p.train_tasks))) for p in self.phases]
        state = distributed.from_main(lambda: self._read_checkpoint(checkpoint_path, sizes), "reading the checkpoint")
        if state is not None:
            try:
                self.method.load_model_state(state["model"])
                self.method.load_state_dict(state["method"])
                rows = [list(r) for r in state["rows"]]
                counts_train = state["counts_train"].clone()
                counts_test = state["counts_test"].clone()
                if tuple(state.get("reduce_sim", torch.zeros(0)).shape) == tuple(reduce_sim.shape):
                    reduce_sim = state["reduce_sim"].clone()
                position = dict(state["position"])
                elapsed = dict(state["elapsed"])
                optimizer_state = state["optimizer"]
                torch.set_rng_state(state["rng"])
                restore_scaler(scaler, state.get("scaler"), checkpoint_path, position["global_step"] > 0)
                buffer = self.method.buffer
                if buffer is not None and len(buffer) and not 0 <= int(buffer.indices.min()) <= int(
                        buffer.indices.max()) < len(self.train_pool):
                    raise ValueError(f"replay buffer indices outside the training pool [0, {len(self.train_pool)})")
            except CheckpointError:
                raise
            except (AttributeError, IndexError, KeyError, TypeError, ValueError, RuntimeError) as error:
                raise CheckpointError(f"checkpoint {checkpoint_path}: does not fit this run ({error})") from error
            log.info("resuming %s at phase %d epoch %d step %d", cfg.method, position["phase"], position["epoch"],
                     position["step"])
        elif self.resume:
            log.info("no checkpoint in %s: starting from the beginning", self.output)
        elapsed["setup"] += time.perf_counter() - started

        total = sum(sizes) * cfg.epochs
        done = sum(sizes[: position["phase"]]) * cfg.epochs + sizes[min(position["phase"], len(sizes) - 1)] * (
            position["epoch"] if position["phase"] < len(sizes) else 0
        )
        bar = tqdm(total=total, initial=min(done, total), unit="ex", dynamic_ncols=True, desc=cfg.method,
                   disable=not cfg.progress or not distributed.is_main())

        def checkpoint(pos: dict[str, int], optimizer: torch.optim.Optimizer | None) -> None:
            if not distributed.is_main():  # rank 0 writes (.output); the others skip the serialisation too
                return
            save_checkpoint(
                checkpoint_path,
                {
                    "config_fingerprint": cfg.fingerprint(),
                    "backbone_fingerprint": self.backbone_fingerprint,
                    "config": cfg.to_dict(),
                    "position": dict(pos),
                    "model": self.method.model_state(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else {},
                    "method": self.method.state_dict(),
                    "rows": rows,
                    "counts_train": counts_train,
                    "counts_test": counts_test,
                    "reduce_sim": reduce_sim,
                    "elapsed": elapsed,
                    "rng": torch.get_rng_state(),
                    "scaler": scaler.state_dict(),
                },
            )

        labels = self.train_pool.labels.to(self.device)
        for p in range(position["phase"], len(self.phases)):
            phase = self.phases[p]
            mask = class_mask(cfg.train_mask, self.benchmark, phase.train_tasks, self.device)
            self.method.begin_task(phase.task_id)  # every process, also when resuming inside the phase
            optimizer = self.optimizer = self._new_optimizer()  # the attribute: the current phase's (tests read it)
            if optimizer_state and p == position["phase"] and (position["epoch"] or position["step"]):
                restore_optimizer(optimizer, optimizer_state, checkpoint_path)
            indices = self.train_pool.task_indices(list(phase.train_tasks))
            first_epoch = position["epoch"] if p == position["phase"] else 0
            for epoch in range(first_epoch, cfg.epochs):
                batches = train_batches(indices, cfg.batch_size, generator(cfg.seed, "epoch", p, epoch),
                                        self.train_pool.lengths)
                first_step = position["step"] if (p == position["phase"] and epoch == first_epoch) else 0
                if first_step:
                    bar.update(sum(len(b) for b in batches[:first_step]))
                bar.set_description(f"{cfg.method} task {p + 1}/{len(self.phases)} epoch {epoch + 1}/{cfg.epochs}")
                tick = time.perf_counter()
                self.method.model.train()
                steps = range(first_step, len(batches))
                step_batches = [self._with_replay(batches[step], p, epoch, step) for step in steps]
                shards = [distributed.shard(b) for b in step_batches]  # this process's part of each global batch
                seeds = [item_seeds(cfg.seed, p, epoch, step, len(b))[start: start + len(part)]
                         if self.train_pool.sources is not None else None
                         for step, b, (part, start) in zip(steps, step_batches, shards, strict=True)]
                loaded = self._inputs(self.train_pool, [part for part, _ in shards], seeds)
                for step, batch, (part, start), inputs in zip(steps, step_batches, shards, loaded, strict=True):
                    optimizer.zero_grad(set_to_none=True)
                    params = self.method.trainable_parameters()
                    loss_value, parts, selected = self._train_step(
                        part, start, len(batch), len(batches[step]), phase.task_id, labels, mask, scaler, inputs,
                        params)
                    where = (p, epoch, step, len(batches), batch)
                    if not math.isfinite(loss_value):
                        raise self._non_finite(f"loss {loss_value}", *where)
                    scaler.unscale_(optimizer)  # no-op unless fp16
                    if cfg.clip_grad > 0:
                        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                    else:
                        norm = torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None])
                    # fp16: an overflowed gradient is the scaler's business (it skips the step, lowers the scale)
                    if not scaler.is_enabled() and not bool(torch.isfinite(norm)):
                        raise self._non_finite(f"gradient norm {float(norm)}", *where)
                    scaler.step(optimizer)
                    scaler.update()
                    if selected is not None:
                        counts_train[max(phase.train_tasks)] += selected
                    if "reduce_sim" in parts:
                        reduce_sim[p, epoch] += torch.tensor([parts["reduce_sim"], 1.0], dtype=torch.float64)
                    position.update(phase=p, epoch=epoch, step=step + 1)
                    position["global_step"] += 1
                    elapsed["examples"] += len(batches[step])
                    bar.update(len(batches[step]))
                    bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                    if cfg.checkpoint_every and position["global_step"] % cfg.checkpoint_every == 0:
                        elapsed["train"] += time.perf_counter() - tick
                        tick = time.perf_counter()
                        checkpoint(position, optimizer)
                    if self.step_hook is not None:
                        self.step_hook(position["global_step"])
                elapsed["train"] += time.perf_counter() - tick
                position.update(epoch=epoch + 1, step=0)
            tick = time.perf_counter()
            self.method.model.eval()
            self.method.end_task(
                TaskEnd(max(phase.train_tasks), indices, self.train_pool.labels,
                        generator(cfg.seed, "end_task", p), self._backward_on(phase, mask),
                        selection_counts=counts_train[max(phase.train_tasks)].clone())
            )
            row, counts = self._evaluate(phase)
            rows.append(row)
            if counts is not None:
                counts_test = counts
            elapsed["eval"] += time.perf_counter() - tick
            position.update(phase=p + 1, epoch=0, step=0)
            checkpoint(position, None)
        bar.close()
        results = self._results(rows, counts_train, counts_test, elapsed)
        if reduce_sim[..., 1].any():
            results["reduce_sim_per_epoch"] = (reduce_sim[..., 0] / reduce_sim[..., 1].clamp(min=1)).tolist()
        diagnostics = selection_diagnostics(results)
        if diagnostics:
            results["selection_diagnostics"] = diagnostics
        results["processes"] = distributed.world_size()
        write_json(self.output / RESULTS_NAME, results)  # rank 0 writes (.output)
        return results

    def _read_checkpoint(self, path: Path, sizes: list[int]) -> dict[str, Any] | None:
        """The checkpoint to resume from, read and checked against the run's plan (None: start afresh)."""
        if not (self.resume and path.exists()):
            return None
        cfg = self.config
        state = load_checkpoint(path, cfg.fingerprint(), self.backbone_fingerprint)
        check_run_state(
            state, path, batches_per_epoch=[math.ceil(n / cfg.batch_size) for n in sizes], epochs=cfg.epochs,
            evaluated_tasks=[p.eval_tasks for p in self.phases], num_tasks=self.benchmark.num_tasks,
            pool_size=cfg.pool_size,
        )
        return state

    def _train_step(self, part: Tensor, start: int, size: int, new: int, task_id: int, labels: Tensor, mask: Tensor,
                    scaler: torch.amp.GradScaler, inputs: Any,
                    params: list[torch.nn.Parameter]) -> tuple[float, dict[str, float], Tensor | None]:
        """Forward and backward of this process's ``part`` (items ``start`` … of a global batch of ``size``, whose
        first ``new`` are not replayed), its loss weighted by its share and the gradients of ``params`` summed
        over the processes. Returns the global batch's loss, its logged ``reduce_sim`` (when the method logs
        one) and the prompt counts (M,) of its ``new`` items (None without prompt ids)."""
        pool_size = self.config.pool_size
        extra = torch.zeros(4 + pool_size, dtype=torch.float64)  # loss, reduce_sim, has it, has ids, then the counts
        if len(part):
            out = self._forward(part, task_id, True, self.train_pool, self.train_cache, inputs)
            loss, logged = self.method.loss(out, labels[part.to(self.device)], mask)
            share = len(part) / size
            scaler.scale(loss * share).backward()
            extra[0] = float(loss.detach()) * share
            if "reduce_sim" in logged:
                extra[1:3] = torch.tensor([logged["reduce_sim"] * share, 1.0])
            if "prompt_idx" in out:
                ids = out["prompt_idx"][: max(0, min(len(part), new - start))].flatten().cpu()
                extra[3] = 1.0
                extra[4:] = torch.bincount(ids, minlength=pool_size).double()
        else:
            self._join_collectives(task_id, train=True)
        extra = distributed.all_reduce_grads(params, extra)
        parts = {"reduce_sim": float(extra[1])} if extra[2] > 0 else {}
        selected = extra[4:].round().long() if extra[3] > 0 else None
        return float(extra[0]), parts, selected

    def _join_collectives(self, task_id: int, train: bool) -> None:
        """An empty share of a global batch (fewer items than processes) still takes part in the collectives of
        the forward: the global prompt vote, unless the model passes its task's prompt mask (training)."""
        if self.voting_pools:
            masked = train and bool(getattr(self.method.model, "use_prompt_mask", False))
            distributed.join_vote(self.voting_pools, task_id if masked else None)

    def _with_replay(self, batch: Tensor, phase: int, epoch: int, step: int) -> Tensor:
        """The step's batch plus its replayed items (drawn from a generator seeded by the step)."""
        if self.method.buffer is None:
            return batch
        replay = self.method.buffer.sample(self.config.replay_batch_size,
                                           generator(self.config.seed, "replay", phase, epoch, step))
        return torch.cat([batch, replay])

    def _non_finite(self, what: str, phase: int, epoch: int, step: int, steps: int,
                    batch: Tensor) -> NonFiniteLossError:
        checkpoint = self.output / CHECKPOINT_NAME
        kept = f"the last checkpoint ({checkpoint}) holds the state before it" if checkpoint.exists() else \
            "no checkpoint was written yet"
        return NonFiniteLossError(
            f"training diverged: non-finite {what} in task {phase + 1} of {len(self.phases)}, epoch {epoch + 1} of "
            f"{self.config.epochs}, step {step + 1} of {steps}; batch items: {self.train_pool.describe(batch)}. "
            f"The optimiser step was not taken and {kept}. Check these items for NaN/inf values (then continue "
            "with --resume), or lower --lr."
        )

    def _backward_on(self, phase: Phase, mask: Tensor) -> Callable[[Tensor], None]:
        """``TaskEnd.backward_on``: the cross-entropy's gradient on a global batch, each process on its share."""
        labels = self.train_pool.labels.to(self.device)

        def backward_on(indices: Tensor) -> None:
            part, _ = distributed.shard(indices)
            if len(part):
                out = self._forward(part, phase.task_id, True, self.train_pool, self.train_cache)
                loss = Method.loss(self.method, out, labels[part.to(self.device)], mask)[0]
                (loss * (len(part) / len(indices))).backward()
            else:
                self._join_collectives(phase.task_id, train=True)
            distributed.all_reduce_grads(self.method.trainable_parameters())

        return backward_on

    @torch.no_grad()
    def _evaluate(self, phase: Phase) -> tuple[list[float], Tensor | None]:
        """Accuracy (%) on each evaluated task's test set, all seen classes competing; prompt counts per task."""
        from tqdm.auto import tqdm

        cfg = self.config
        pool = self.test_pool
        seen = self.benchmark.num_seen_classes(max(phase.eval_tasks))
        indices = pool.task_indices(list(phase.eval_tasks))
        num_tasks = self.benchmark.num_tasks
        correct = torch.zeros(num_tasks, dtype=torch.long)
        totals = torch.zeros(num_tasks, dtype=torch.long)
        counts = torch.zeros(num_tasks, cfg.pool_size, dtype=torch.long)
        flags = torch.zeros(2, dtype=torch.long)  # prompt ids seen, non-finite logits seen
        bad = None
        parts = [distributed.shard(b)[0] for b in eval_batches(indices, cfg.eval_batch_size, pool.lengths)]
        loaded = self._inputs(pool, parts, [None] * len(parts))
        for part, inputs in zip(tqdm(parts, desc=f"{cfg.method} eval", unit="batch", leave=False,
                                     disable=not cfg.progress or not distributed.is_main()), loaded, strict=True):
            if not len(part):
                self._join_collectives(-1, train=False)
                continue
            out = self._forward(part, -1, False, pool, self.test_cache, inputs)
            logits = out["logits"][:, :seen]
            if not bool(torch.isfinite(logits).all()):
                bad = bad or pool.describe(part)
                flags[1] = 1
            pred = logits.argmax(dim=1).cpu()
            hit = (pred == pool.labels[part]).long()
            tasks = pool.tasks[part]
            correct.index_add_(0, tasks, hit)
            totals.index_add_(0, tasks, torch.ones_like(hit))
            self.method.observe_eval(out, tasks)  # this process's items (CODA's component weights)
            if "prompt_idx" in out:
                flags[0] = 1
                ids = out["prompt_idx"].cpu()
                for t in tasks.unique().tolist():
                    counts[t] += torch.bincount(ids[tasks == t].flatten(), minlength=cfg.pool_size)
        # every process adds its shares: integer sums, so each test item counts once, exactly
        summed = distributed.all_reduce_(torch.cat([correct, totals, counts.flatten(), flags]).to(self.device),
                                         "summing the evaluation counts").cpu()
        self.method.finish_eval()
        correct, totals = summed[:num_tasks], summed[num_tasks: 2 * num_tasks]
        counts = summed[2 * num_tasks: -2].view(num_tasks, cfg.pool_size) if summed[-2] else None
        if summed[-1]:
            raise NonFiniteLossError(
                f"evaluation after task {self.phases.index(phase) + 1} of {len(self.phases)}: non-finite logits "
                f"for test items {bad or '(on another process)'}; their accuracy would be meaningless. Check these "
                "items for NaN/inf values."
            )
        row = [100.0 * float(correct[t]) / max(int(totals[t]), 1) for t in phase.eval_tasks]
        return row, counts

    def _results(self, rows: list[list[float]], counts_train: Tensor, counts_test: Tensor,
                 elapsed: dict[str, float]) -> dict[str, Any]:
        cfg = self.config
        bench = self.benchmark
        if cfg.method == "joint":
            average, forget, curve, bwt, learning = sum(rows[0]) / len(rows[0]), None, None, None, None
        else:
            summary = metrics.summarize(rows)
            average, forget = summary["average_accuracy"], summary["forgetting"]
            curve, bwt = summary["average_accuracy_curve"], summary["backward_transfer"]
            learning = summary["learning_accuracy"]
        seconds = elapsed["setup"] + elapsed["train"] + elapsed["eval"]
        results: dict[str, Any] = {
            "method": cfg.method,
            "benchmark": cfg.benchmark,
            "average_accuracy": average,
            "forgetting": forget,
            "backward_transfer": bwt,
            "learning_accuracy": learning,
            "accuracy_matrix": rows,
            "average_accuracy_curve": curve,
            "final_accuracy_per_task": rows[-1],
            "seconds": seconds,
            "train_seconds": elapsed["train"],
            "eval_seconds": elapsed["eval"],
            "train_examples": int(elapsed["examples"]),
            "train_examples_per_second": elapsed["examples"] / elapsed["train"] if elapsed["train"] else None,
            "num_tasks": bench.num_tasks,
            "tasks": [[bench.class_names[c] for c in classes] for classes in bench.tasks],
            "train_size": len(self.train_pool),
            "test_size": len(self.test_pool),
            "trainable_parameters": sum(p.numel() for p in self.method.trainable_parameters()),
            "backbone": self.backbone.name,
            "device": str(self.device),
            "precision": cfg.precision,
            "precision_requested": self.requested_precision,
            "compile": cfg.compile,
            "config": cfg.to_dict(),
        }
        if self.method.uses_prompts:
            results["prompt_counts_train"] = counts_train.tolist()
            results["prompt_counts_test"] = counts_test.tolist()
        if self.method.buffer is not None:
            results["buffer_size"] = len(self.method.buffer)
        results.update(self.method.results())
        return results


def train(config: RunConfig, output: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run one method (see :class:`Trainer`) and return its results dict."""
    return Trainer(config, output, **kwargs).run()
