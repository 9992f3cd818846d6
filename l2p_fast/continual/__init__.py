"""Continual learning: benchmarks, metrics and plots (``l2p_fast.continual.plots``, needs matplotlib)."""

from .benchmarks import ContinualBenchmark, available_benchmarks, get_benchmark
from .metrics import average_accuracy, backward_transfer, forgetting, summarize

__all__ = [
    "ContinualBenchmark",
    "available_benchmarks",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "get_benchmark",
    "summarize",
]
