"""Continual learning: benchmarks, metrics, methods, the trainer, comparisons and plots.

``train(RunConfig(method="l2p"), "runs/l2p")`` runs one method; ``compare("l2p,seq", config, "runs/cmp")``
several (``seeds="0,1,2"``: each once per seed, mean ± std). Plots need matplotlib, models need
transformers / timm; both are imported only when used.
Errors of a run: :class:`CheckpointError` and :class:`OutputError` (both ``ValueError``) and
:class:`NonFiniteLossError` (a ``RuntimeError``: the loss, a gradient or evaluation logits became NaN/inf).
"""

from .benchmarks import ContinualBenchmark, available_benchmarks, get_benchmark
from .checkpoint import CheckpointError
from .compare import compare
from .config import METHODS, RunConfig, resolve
from .diagnostics import selection_diagnostics
from .metrics import average_accuracy, backward_transfer, forgetting, learning_accuracy, summarize
from .output import OutputError
from .seeds import summarize_seeds
from .settings import load_settings
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
    "learning_accuracy",
    "load_settings",
    "resolve",
    "selection_diagnostics",
    "summarize",
    "summarize_seeds",
    "train",
]
