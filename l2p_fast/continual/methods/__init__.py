"""The methods by name: ``l2p``, ``l2p+er``, ``dualprompt``, ``seq``, ``seq-frozen``, ``ewc``, ``er``, ``joint``."""

from __future__ import annotations

from ..backbones import Backbone
from ..config import METHODS, RunConfig
from .base import Method, TaskEnd
from .dualprompt import DualPrompt
from .ewc import EWC
from .finetune import FineTune, FrozenFineTune
from .prompting import L2P
from .replay import ReplayBuffer

METHOD_CLASSES: dict[str, type[Method]] = {
    "l2p": L2P,
    "l2p+er": L2P,
    "dualprompt": DualPrompt,
    "seq": FineTune,
    "seq-frozen": FrozenFineTune,
    "ewc": EWC,
    "er": FineTune,
    "joint": FineTune,
}


def make_method(config: RunConfig, backbone: Backbone, num_classes: int) -> Method:
    """Build the method named ``config.method`` on a copy of ``backbone``."""
    if config.method not in METHOD_CLASSES:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {config.method!r}")
    method = METHOD_CLASSES[config.method](config, backbone, num_classes)
    method.name = config.method
    return method


__all__ = [
    "EWC", "L2P", "METHOD_CLASSES", "DualPrompt", "FineTune", "FrozenFineTune", "Method", "ReplayBuffer", "TaskEnd",
    "make_method",
]
