"""The ``l2p-fast`` command line: ``train`` one method, ``compare`` several on one benchmark (over one seed or
several), ``report`` a comparison's results block (into a README).

Every argument is checked (names, numbers, the output folder, the backend on this machine) before
any data or model is loaded. Every failure, then or later (bad data, a corrupt checkpoint, a
diverged run, a full disk), ends the command with one line ``l2p-fast: error: ...`` and exit status
2, never a traceback; Ctrl-C ends it with status 130 and a hint to ``--resume``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, NoReturn

# (flag, config field, argparse options); defaults are None so that unset flags keep the config's defaults
OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--benchmark", "benchmark", {"help": "wordnet20 (default, offline), split_cifar100, five_datasets, "
                                          "image_folder, tensor_file"}),
    ("--data", "data", {"help": "path of a tensor_file / image_folder benchmark, or the torchvision data root"}),
    ("--download", "download", {"action": "store_true", "default": None, "help": "let torchvision download data"}),
    ("--classes-per-task", "classes_per_task", {"type": int}),
    ("--class-order-seed", "class_order_seed", {"type": int, "help": "shuffle the class order with this seed"}),
    ("--train-per-class", "train_per_class", {"type": int, "help": "text: keep this many training examples per class"}),
    ("--test-per-class", "test_per_class", {"type": int, "help": "text: keep this many test examples per class"}),
    ("--validation", "validation_fraction", {"type": float, "help": "hold out this share (0-1) of each class's "
                                                    "training data and evaluate on it instead of the test set"}),
    ("--backbone", "backbone", {"help": "text: transformers folder or hub name (default: offline all-MiniLM-L6-v2); "
                                        "images: timm ViT name (default vit_base_patch16_224)"}),
    ("--no-pretrained", "pretrained", {"action": "store_false", "default": None, "help": "images: random weights"}),
    ("--image-size", "image_size", {"type": int}),
    ("--max-length", "max_length", {"type": int, "help": "text: tokens per example (truncation)"}),
    ("--epochs", "epochs", {"type": int, "help": "epochs per task (wordnet20 default: the demo budget)"}),
    ("--batch-size", "batch_size", {"type": int, "help": "the global training batch (under torchrun split over "
                                                         "the processes)"}),
    ("--eval-batch-size", "eval_batch_size", {"type": int}),
    ("--lr", "lr", {"type": float, "help": "Adam learning rate for the global batch, not scaled with the number "
                                           "of processes (default: per method)"}),
    ("--seed", "seed", {"type": int}),
    ("--clip-grad", "clip_grad", {"type": float, "help": "gradient-norm clipping (0: off)"}),
    ("--train-mask", "train_mask", {"help": "classes in the training loss: task, seen or all (default: per method)"}),
    ("--pool-size", "pool_size", {"type": int, "help": "L2P: prompts in the pool (M)"}),
    ("--top-k", "top_k", {"type": int, "help": "L2P/DualPrompt: prompts chosen per input (K; default l2p 5, "
                                               "dualprompt 1)"}),
    ("--prompt-length", "prompt_length", {"type": int, "help": "L2P: tokens per prompt (Lp)"}),
    ("--pull-lambda", "pull_lambda", {"type": float, "help": "L2P: weight λ of the pull constraint"}),
    ("--batchwise-prompt", "batchwise_prompt", {"action": argparse.BooleanOptionalAction, "default": None,
                                                "help": "L2P: batch-wise prompt vote (default: off; dualprompt on)"}),
    ("--prompt-mask", "use_prompt_mask", {"action": argparse.BooleanOptionalAction, "default": None,
                                          "help": "L2P: train task t on prompts t·K … t·K+K−1 (default: off; "
                                                  "dualprompt on)"}),
    ("--diversity", "diversity", {"action": "store_true", "default": None,
                                  "help": "L2P: diversified selection in training (the paper's equation 4): the "
                                          "query-key distance weighted by each prompt's selection frequency in "
                                          "earlier tasks"}),
    ("--shared-prompt-pool", "shared_prompt_pool", {"action": "store_true", "default": None,
                                                    "help": "L2P: at the start of task t > 0 copy task t-1's prompt "
                                                            "slots (ids (t-1)·K … t·K-1) into task t's"}),
    ("--shared-prompt-key", "shared_prompt_key", {"action": "store_true", "default": None,
                                                  "help": "L2P: the same copy for the keys"}),
    ("--coda-components", "coda_components", {"type": int, "help": "CODA-Prompt: components over all tasks (M, "
                                                                    "M / tasks per task; default 100, at most the "
                                                                    "backbone's width)"}),
    ("--coda-length", "coda_length", {"type": int, "help": "CODA-Prompt: even prompt length (Lp, default 8: half "
                                                            "key, half value prefix)"}),
    ("--ortho-mu", "ortho_mu", {"type": float, "help": "CODA-Prompt: orthogonality loss weight (default 0: off)"}),
    ("--head-type", "head_type", {"help": "L2P: token, prompt, token+prompt or gap (default prompt); dualprompt: "
                                          "token (default) or gap"}),
    ("--backend", "backend", {"help": "prompt-pool backend: auto, reference, cpu, cuda, triton"}),
    ("--ewc-lambda", "ewc_lambda", {"type": float}),
    ("--fisher-samples", "fisher_samples", {"type": int}),
    ("--buffer-per-class", "buffer_per_class", {"type": int, "help": "replay: stored examples per class"}),
    ("--replay-batch-size", "replay_batch_size", {"type": int}),
    ("--checkpoint-every", "checkpoint_every", {"type": int, "help": "steps between checkpoints (0: per task only)"}),
    ("--device", "device", {"help": "auto, cpu or cuda"}),
    ("--precision", "precision", {"help": "auto (default: bf16 where the hardware runs it natively, else fp32), "
                                          "fp32, bf16 or fp16 autocast of the forward passes (prompts, keys, "
                                          "head and optimiser state stay fp32)"}),
    ("--compile", "compile", {"action": "store_true", "default": None, "help": "torch.compile the model's forward"}),
    ("--threads", "num_threads", {"type": int}),
    ("--workers", "num_workers", {"type": int, "help": "images: worker processes loading and augmenting the next "
                                                        "batches (default 0: in the main process)"}),
    ("--no-progress", "progress", {"action": "store_false", "default": None}),
]


DEFAULT_METHODS = "l2p,seq,seq-frozen,ewc,er,joint"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors (its sub-commands' too) read ``l2p-fast: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"l2p-fast: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``l2p-fast``."""
    parser = Parser(prog="l2p-fast", description="Learning to Prompt: continual-learning runs")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one method; writes OUTPUT/results.json and plots")
    train.add_argument("--method", required=True, help="l2p, l2p+er, dualprompt, seq, seq-frozen, ewc, er or joint")
    compare = commands.add_parser("compare", help="train several methods; prints a table, writes plots")
    compare.add_argument("--methods", default=None,
                         help=f"comma-separated methods (default: the --config file's, else {DEFAULT_METHODS})")
    compare.add_argument("--seeds", default=None,
                         help="comma-separated seeds, e.g. 0,1,2: each method once per seed into OUTPUT/seed<N>/, "
                              "the table shows mean ± std (the class order stays fixed; vary it with "
                              "--class-order-seed)")
    report = commands.add_parser("report", help="print the results block of a comparison.json; --readme puts it "
                                                "into a README")
    report.add_argument("comparison", help="a comparison.json written by compare")
    report.add_argument("--readme", default=None, help="replace the results block of this Markdown file")
    report.add_argument("--check", action="store_true", help="with --readme: fail when its block differs")
    for sub in (train, compare):
        sub.add_argument("--output", required=True, help="folder for results, checkpoints and plots")
        sub.add_argument("--config", dest="settings", default=None,
                         help="JSON settings file: shared and per-method config fields (recipes/, sweeps/); "
                              "flags given here override it")
        sub.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
        for flag, dest, options in OPTIONS:
            sub.add_argument(flag, dest=dest, **{"default": None, **options})
    return parser


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set by flags on the command line."""
    from .continual.config import RunConfig

    names = {f.name for f in fields(RunConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def config_from_args(args: argparse.Namespace, method: str, base: dict[str, Any] | None = None) -> Any:
    """A :class:`RunConfig` from parsed arguments over ``base`` fields (unset flags keep them, or the defaults)."""
    from .continual.config import RunConfig

    return RunConfig(**{**(base or {}), **flag_values(args), "method": method})


def run_report(args: argparse.Namespace) -> None:
    """``l2p-fast report``: print the results block, or write / check it in a README."""
    from pathlib import Path

    from .continual.output import write_bytes_atomic
    from .continual.readme_table import current_block, load_comparison, replace_block, results_block

    block = results_block(load_comparison(args.comparison))
    if args.readme is None:
        if args.check:
            raise ValueError("check: --check needs --readme")
        print(block)
        return
    readme = Path(args.readme)
    text = readme.read_text()
    if args.check:
        if current_block(text, str(readme)) != block:
            raise ValueError(f"readme: the results block of {readme} differs from what {args.comparison} gives; "
                             f"run: l2p-fast report {args.comparison} --readme {readme}")
        print(f"{readme}: results block up to date")
        return
    write_bytes_atomic(readme, replace_block(text, block, str(readme)).encode())
    print(f"{readme}: results block regenerated from {args.comparison}")


def error_line(error: BaseException) -> str:
    """One readable line for ``error``: its message, or its type when the message is empty."""
    message = " ".join(str(error).split())
    if isinstance(error, OSError) and error.strerror:
        message = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    if isinstance(error, ValueError | TypeError | RuntimeError) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def run_command(args: argparse.Namespace) -> None:
    """Check everything that can be checked before loading, then train or compare (raises on failure)."""
    from .continual import distributed
    from .continual.compare import compare, parse_methods
    from .continual.config import resolve
    from .continual.output import ensure_writable_dir
    from .continual.preflight import check_backend, pick_device
    from .continual.report import comparison_table, diagnostics_table, write_run_plots
    from .continual.seeds import parse_seeds
    from .continual.settings import load_settings
    from .continual.trainer import Trainer

    if args.command == "report":
        run_report(args)
        return
    settings = load_settings(args.settings) if args.settings else {"config": {}, "methods": {}}
    if args.command == "train":
        base = {**settings["config"], **settings["methods"].get(args.method, {})}
        config = resolve(config_from_args(args, args.method, base))
        ensure_writable_dir(args.output, "output")
        with distributed.session(pick_device(config.device)):  # under torchrun: one process of several
            results = Trainer(config, args.output, resume=args.resume).run()
            if distributed.is_main():
                write_run_plots(results, args.output)
                print(comparison_table([results]))
        return
    methods = parse_methods(args.methods or ",".join(settings["methods"]) or DEFAULT_METHODS)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if seeds is not None and args.seed is not None:
        raise ValueError(f"seed: give --seed or --seeds, not both (got --seed {args.seed} and --seeds {args.seeds})")
    config = config_from_args(args, methods[0], settings["config"])
    explicit = flag_values(args)  # flags win over the file's per-method fields
    own = {name: {k: v for k, v in settings["methods"].get(name, {}).items() if k not in explicit} for name in methods}
    for name in methods:
        resolved = resolve(config_from_args(args, name, {**settings["config"], **own[name]}))
        check_backend(resolved, pick_device(resolved.device))
    ensure_writable_dir(args.output, "output")
    with distributed.session(pick_device(resolve(config).device)):
        results = compare(methods, config, args.output, seeds=seeds, method_settings=own, resume=args.resume,
                          settings_file=args.settings)
        if not distributed.is_main():
            return
    print()
    print(comparison_table(results))
    diagnostics = diagnostics_table(results)
    if diagnostics:
        print()
        print(diagnostics)
    print(f"\nresults, plots and checkpoints in {args.output}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``l2p-fast`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_command(args)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure ends in one readable line, never a traceback
        logging.getLogger(__name__).debug("l2p-fast failed", exc_info=True)
        if type(error).__name__ == "RankError":  # another process died: leave at once, past the broken group's
            sys.stderr.write(f"l2p-fast: error: {error_line(error)}\n")  # teardown (gloo may abort in it)
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(2)
        parser.exit(2, f"l2p-fast: error: {error_line(error)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
