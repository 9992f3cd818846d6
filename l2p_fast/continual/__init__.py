"""Continual learning: benchmarks, metrics, methods, the trainer, comparisons and plots.

``train(RunConfig(method="l2p"), "runs/l2p")`` runs one method; ``compare("l2p,seq", config, "runs/cmp")``
several. Plots need matplotlib, models need transformers / timm; both are imported only when used.
Errors of a run: :class:`CheckpointError` and :class:`OutputError` (both ``ValueError``) and
:class:`NonFiniteLossError` (a ``RuntimeError``: the loss, a gradient or evaluation logits became NaN/inf).
"""

from .benchmarks import ContinualBenchmark, available_benchmarks, get_benchmark
from .checkpoint import CheckpointError
from .compare import compare
from .config import METHODS, RunConfig, resolve
from .metrics import average_accuracy, backward_transfer, forgetting, summarize
from .output import OutputError
from .trainer import NonFiniteLossError, Trainer, train

__all__ = [
    "METHODS",
    "CheckpointError",
    "ContinualBenchmark",
    "NonFiniteLossError",
    "OutputError",
    "RunConfig",
    "Trainer",
    "available_benchmarks",
    "average_accuracy",
    "backward_transfer",
    "compare",
    "forgetting",
    "get_benchmark",
    "resolve",
    "summarize",
    "train",
]
