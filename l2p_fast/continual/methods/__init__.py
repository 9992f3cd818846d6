"""The methods by name: ``l2p``, ``l2p+er``, ``dualprompt``, ``coda-prompt``,
``seq``, ``seq-frozen``, ``ewc``, ``er``, ``joint``."""

from __future__ import annotations

from ..backbones import Backbone
from ..config import METHODS, RunConfig
from .base import Method, TaskEnd
from .coda import CodaPrompt
from .dualprompt import DualPrompt
from .ewc import EWC
from .finetune import FineTune, FrozenFineTune
from .prompting import L2P
from .replay import ReplayBuffer

METHOD_CLASSES: dict[str, type[Method]] = {
    "l2p": L2P,
    "l2p+er": L2P,
    "dualprompt": DualPrompt,
    "coda-prompt": CodaPrompt,
    "seq": FineTune,
    "seq-frozen": FrozenFineTune,
    "ewc": EWC,
    "er": FineTune,
    "joint": FineTune,
}


def make_method(config: RunConfig, backbone: Backbone, num_classes: int, num_tasks: int | None = None) -> Method:
    """Build the method named ``config.method`` on a copy of ``backbone`` (``num_tasks``: the benchmark's, for the
    methods that slice their parameters per task)."""
    if config.method not in METHOD_CLASSES:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {config.method!r}")
    cls = METHOD_CLASSES[config.method]
    extra = {"num_tasks": num_tasks} if getattr(cls, "needs_num_tasks", False) else {}
    method = cls(config, backbone, num_classes, **extra)
    method.name = config.method
    return method


__all__ = [
    "EWC", "L2P", "METHOD_CLASSES", "CodaPrompt", "DualPrompt", "FineTune", "FrozenFineTune", "Method", "ReplayBuffer",
    "TaskEnd", "make_method",
]
