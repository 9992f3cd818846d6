"""1 process against 2 (torch.distributed, gloo on the CPU) on the same run: throughput and where the time goes.

    python bench/distributed_scaling.py [--method l2p] [--train-per-class 16] [--batch-size 16] [--json PATH]

Runs one method on the embedded ``wordnet20`` benchmark with the offline MiniLM encoder three ways, the
same global batch each time: 1 process on 1 thread, 1 process on 2 threads, 2 processes of 1 thread
(spawned here, ``init_method=file://``). Reported per way: training seconds and examples per second
(the trainer's own clock, no set-up or feature cache), evaluation seconds, and for 2 processes the
seconds spent in the collectives of the step (the gradient sum, ``distributed.all_reduce_grads``)
and of the evaluation counts. Prints a table; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _timed(module: Any, name: str, box: dict[str, float]) -> None:
    """Wrap ``module.name`` so the seconds spent inside it add up in ``box[name]``."""
    inner = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            box[name] = box.get(name, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def _run(rank: int, world: int, threads: int, options: dict[str, Any], folder: str, init: str | None) -> None:
    import torch

    from l2p_fast.continual import distributed
    from l2p_fast.continual.config import RunConfig
    from l2p_fast.continual.trainer import Trainer

    torch.set_num_threads(threads)
    if world > 1:
        distributed.init("cpu", init_method=f"file://{init}", world_size=world, rank=rank)
    box: dict[str, float] = {}
    _timed(distributed, "all_reduce_grads", box)
    _timed(distributed, "all_reduce_", box)
    config = RunConfig(**options, num_threads=threads, device="cpu", progress=False, checkpoint_every=0)
    results = Trainer(config, Path(folder) / f"run-{world}x{threads}", cache_dir=Path(folder) / "cache").run()
    record = {key: results[key] for key in ("train_seconds", "eval_seconds", "train_examples",
                                            "train_examples_per_second", "accuracy_matrix")}
    record.update(collective_seconds=box, processes=world, threads=threads)
    (Path(folder) / f"record-{world}x{threads}-rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        distributed.barrier()
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="l2p")
    parser.add_argument("--train-per-class", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32", help="fp32 (default), bf16 or auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    options = {"method": args.method, "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
               "batch_size": args.batch_size, "epochs": 1, "seed": 0, "precision": args.precision}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        _run(0, 1, 1, options, folder, None)  # also fills the feature cache the other runs read
        _run(0, 1, 2, options, folder, None)
        mp.start_processes(_run, args=(2, 1, options, folder, os.path.join(folder, "init")), nprocs=2, join=True,
                           start_method="spawn")
        for name in ("1x1-rank0", "1x2-rank0", "2x1-rank0", "2x1-rank1"):
            rows.append(json.loads((Path(folder) / f"record-{name}.json").read_text()))
    print(f"{args.method} on wordnet20, {rows[0]['train_examples']} training examples, global batch {args.batch_size}, "
          f"{args.precision}")
    for row in rows[:3]:
        print(f"  {row['processes']} x {row['threads']}: accuracy matrix {row['accuracy_matrix']}")
    print("| processes x threads | train s | examples/s | eval s | step collectives s | eval-count collectives s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        box = row["collective_seconds"]
        label = f"{row['processes']} x {row['threads']}" + (" (rank 1)" if row is rows[3] else "")
        print(f"| {label} | {row['train_seconds']:.2f} | {row['train_examples_per_second']:.1f} | "
              f"{row['eval_seconds']:.2f} | {box.get('all_reduce_grads', 0.0):.3f} | "
              f"{box.get('all_reduce_', 0.0):.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"options": options, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
