"""The configuration of one continual-learning run, its defaults per method and benchmark, and its checks.

Every field is validated by :func:`validate_config` before any data or model is loaded, so a bad
number, name or combination fails with a ``ValueError`` naming the argument, what was expected and
what was given.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

METHODS = ("l2p", "l2p+er", "dualprompt", "coda-prompt", "seq", "seq-frozen", "ewc", "er", "joint")
PROMPT_METHODS = ("l2p", "l2p+er", "dualprompt")
REPLAY_METHODS = ("er", "l2p+er")
TRAIN_MASKS = ("task", "seen", "all")
HEAD_TYPES = ("token", "prompt", "token+prompt", "gap")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # as l2p_fast.models.precision.PRECISIONS (kept import-free here)

# learning rate and train-time logit mask of each method when the config leaves them unset
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "l2p": {"lr": 0.03, "train_mask": "task"},
    "l2p+er": {"lr": 0.03, "train_mask": "seen"},
    "dualprompt": {"lr": 0.03, "train_mask": "task"},
    "coda-prompt": {"lr": 0.03, "train_mask": "task"},  # as l2p/dualprompt (methods/coda.py: why not the paper's 1e-3)
    "seq": {"lr": 1e-4, "train_mask": "seen"},
    "seq-frozen": {"lr": 0.01, "train_mask": "seen"},
    "ewc": {"lr": 1e-4, "train_mask": "seen"},
    "er": {"lr": 1e-4, "train_mask": "seen"},
    "joint": {"lr": 1e-4, "train_mask": "all"},
}

# prompt settings left unset (None) take the method's: L2P's paper values, or DualPrompt's (paper and port: top-1,
# batch vote, train-time task mask, CLS head); methods not listed take L2P's (they do not use them)
PROMPT_DEFAULTS: dict[str, dict[str, Any]] = {
    "l2p": {"top_k": 5, "batchwise_prompt": False, "use_prompt_mask": False, "head_type": "prompt"},
    "dualprompt": {"top_k": 1, "batchwise_prompt": True, "use_prompt_mask": True, "head_type": "token"},
}
DUALPROMPT_HEAD_TYPES = ("token", "gap")

# the budget each benchmark runs with when epochs / subset sizes are left unset (wordnet20: the demo)
BENCHMARK_BUDGETS: dict[str, dict[str, Any]] = {
    "wordnet20": {"epochs": 1, "train_per_class": 40, "test_per_class": 30},
}
DEFAULT_EPOCHS = 5

# fields that do not change the numbers of a run (left out of the resume fingerprint)
NON_RESULT_FIELDS = ("device", "num_threads", "num_workers", "checkpoint_every", "progress", "eval_batch_size")
# result fields added after runs were checkpointed: left out of the fingerprint at these values, so those resume
NEW_FIELD_DEFAULTS: dict[str, Any] = {"precision": "fp32", "compile": False, "validation_fraction": 0.0,
                                      "diversity": False, "shared_prompt_pool": False, "shared_prompt_key": False}
PROMPT_FIELDS = ("pool_size", "top_k", "prompt_length", "pull_lambda", "batchwise_prompt", "use_prompt_mask",
                 "head_type", "backend", "diversity", "shared_prompt_pool", "shared_prompt_key")
# L2P-only options (methods l2p, l2p+er): docs/behaviour.md §8 and §10
L2P_ONLY_FIELDS = ("diversity", "shared_prompt_pool", "shared_prompt_key")
EWC_FIELDS = ("ewc_lambda", "fisher_samples")
CODA_FIELDS = ("coda_components", "coda_length", "ortho_mu", "backend")
REPLAY_FIELDS = ("buffer_per_class", "replay_batch_size")


@dataclass
class RunConfig:
    """All settings of one run; ``None`` means "the method's / benchmark's default" (see :func:`resolve`)."""

    method: str = "l2p"
    benchmark: str = "wordnet20"
    data: str | None = None  # tensor_file / image_folder path, or the torchvision root of image benchmarks
    download: bool = False
    classes_per_task: int | None = None
    class_order_seed: int | None = None
    train_per_class: int | None = None
    test_per_class: int | None = None
    # > 0: hold out this share of each class's training data and evaluate on it instead of the test set
    # (benchmarks/validation.py; for choosing hyper-parameters)
    validation_fraction: float = 0.0
    backbone: str | None = None  # text: transformers folder/name (None: offline all-MiniLM-L6-v2); image: timm name
    pretrained: bool = True
    image_size: int = 224
    max_length: int = 32
    epochs: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float | None = None
    seed: int = 0
    clip_grad: float = 1.0
    train_mask: str | None = None
    # L2P
    pool_size: int = 10
    top_k: int | None = None  # None: PROMPT_DEFAULTS of the method (also the three below)
    prompt_length: int = 5
    pull_lambda: float = 0.1
    batchwise_prompt: bool | None = None
    use_prompt_mask: bool | None = None
    head_type: str | None = None
    backend: str = "auto"
    diversity: bool = False  # L2P's diversified selection in training (its equation 4)
    shared_prompt_pool: bool = False  # copy task t-1's prompt slots into task t's at its start (the port's option)
    shared_prompt_key: bool = False  # the same for the keys
    # CODA-Prompt (the paper's defaults: 100 components over all tasks, Lp 8 split key/value, layers 0-4, μ 0)
    coda_components: int | None = None  # None: 100, at most the backbone's width (Gram–Schmidt needs width >= M)
    coda_length: int = 8
    ortho_mu: float = 0.0
    # EWC
    ewc_lambda: float = 1e5
    fisher_samples: int = 200
    # replay
    buffer_per_class: int = 10
    replay_batch_size: int | None = None
    # running
    checkpoint_every: int = 100
    device: str = "auto"
    # fp32 | bf16 | fp16 autocast of the forward passes (parameters and optimiser state stay fp32); 'auto' (the
    # default): bf16 where the hardware runs it natively, else fp32 (the trainer replaces 'auto' by its choice)
    precision: str = "auto"
    compile: bool = False  # torch.compile the model's forward
    num_threads: int | None = None
    num_workers: int = 0  # image pools: worker processes that load, decode and augment the next batches
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def fingerprint(self) -> str:
        """SHA-256 of the fields that determine this method's results (resume refuses another run's checkpoint).

        Options of other methods (e.g. ``ewc_lambda`` for ``l2p``) are left out, so changing them keeps
        the finished runs of a ``compare --resume``.
        """
        skip = set(NON_RESULT_FIELDS)
        groups = ((PROMPT_FIELDS, PROMPT_METHODS), (EWC_FIELDS, ("ewc",)), (REPLAY_FIELDS, REPLAY_METHODS),
                  (CODA_FIELDS, ("coda-prompt",)))
        used = {name for group, methods in groups if self.method in methods for name in group}
        for group, methods in groups:  # a field shared by groups (backend) stays when any of them applies
            if self.method not in methods:
                skip.update(name for name in group if name not in used)
        values = {k: v for k, v in self.to_dict().items() if k not in skip}
        for name, default in NEW_FIELD_DEFAULTS.items():  # at their defaults, the fingerprints of older runs
            if values.get(name) == default:
                values.pop(name)
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def resolve(config: RunConfig) -> RunConfig:
    """Fill the unset fields from the method and benchmark defaults, then validate; returns a new config."""
    validate_config(config)
    method = METHOD_DEFAULTS[config.method]
    budget = BENCHMARK_BUDGETS.get(config.benchmark, {})
    prompt = PROMPT_DEFAULTS.get(config.method, PROMPT_DEFAULTS["l2p"])
    out = replace(
        config,
        **{name: value if getattr(config, name) is None else getattr(config, name) for name, value in prompt.items()},
        lr=method["lr"] if config.lr is None else config.lr,
        train_mask=method["train_mask"] if config.train_mask is None else config.train_mask,
        epochs=budget.get("epochs", DEFAULT_EPOCHS) if config.epochs is None else config.epochs,
        train_per_class=budget.get("train_per_class") if config.train_per_class is None else config.train_per_class,
        test_per_class=budget.get("test_per_class") if config.test_per_class is None else config.test_per_class,
        replay_batch_size=config.batch_size if config.replay_batch_size is None else config.replay_batch_size,
    )
    validate_config(out)
    return out


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _check_float(name: str, value: Any, minimum: float, optional: bool = False, strict: bool = False) -> None:
    if value is None and optional:
        return
    bad = isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    if not bad:
        bad = value <= minimum if strict else value < minimum
    if bad:
        expected = f"a finite number {'>' if strict else '>='} {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def validate_config(config: RunConfig) -> None:
    """Raise ``ValueError`` (argument, expected, actual) for any bad field or combination."""
    from .benchmarks import available_benchmarks

    if not isinstance(config, RunConfig):
        raise TypeError(f"config: expected a RunConfig, got {type(config).__name__}")
    _check_choice("method", config.method, METHODS)
    _check_choice("benchmark", config.benchmark, tuple(available_benchmarks()))
    _check_choice("train_mask", config.train_mask, (*TRAIN_MASKS, None))
    _check_choice("head_type", config.head_type, (*HEAD_TYPES, None))
    if config.method == "dualprompt" and config.head_type not in (*DUALPROMPT_HEAD_TYPES, None):
        raise ValueError(f"head_type: method 'dualprompt' needs one of {list(DUALPROMPT_HEAD_TYPES)}, "
                         f"got {config.head_type!r}")
    _check_choice("device", config.device, DEVICES)
    _check_choice("backend", config.backend, BACKENDS)
    _check_choice("precision", config.precision, PRECISIONS)
    if not isinstance(config.compile, bool):
        raise ValueError(f"compile: expected a bool, got {config.compile!r}")
    for name in ("batch_size", "eval_batch_size", "pool_size", "prompt_length", "image_size", "max_length"):
        _check_int(name, getattr(config, name), 1)
    for name in ("batchwise_prompt", "use_prompt_mask"):
        if getattr(config, name) not in (True, False, None):
            raise ValueError(f"{name}: expected a bool or None, got {getattr(config, name)!r}")
    for name in L2P_ONLY_FIELDS:  # other methods ignore them (as the pool settings for methods without prompts)
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name}: expected a bool, got {getattr(config, name)!r}")
    for name in ("classes_per_task", "train_per_class", "test_per_class", "epochs", "replay_batch_size", "top_k"):
        _check_int(name, getattr(config, name), 1, optional=True)
    _check_int("num_threads", config.num_threads, 1, optional=True)
    _check_int("num_workers", config.num_workers, 0)
    _check_int("seed", config.seed, 0)
    _check_int("class_order_seed", config.class_order_seed, 0, optional=True)
    _check_int("checkpoint_every", config.checkpoint_every, 0)
    _check_int("fisher_samples", config.fisher_samples, 1)
    _check_int("buffer_per_class", config.buffer_per_class, 1)
    _check_float("lr", config.lr, 0.0, optional=True, strict=True)
    _check_float("clip_grad", config.clip_grad, 0.0)
    _check_float("pull_lambda", config.pull_lambda, 0.0)
    _check_float("ewc_lambda", config.ewc_lambda, 0.0)
    _check_int("coda_components", config.coda_components, 1, optional=True)
    _check_int("coda_length", config.coda_length, 2)
    if config.coda_length % 2:
        raise ValueError(f"coda_length: expected an even length (half keys, half values), got {config.coda_length}")
    _check_float("ortho_mu", config.ortho_mu, 0.0)
    _check_float("validation_fraction", config.validation_fraction, 0.0)
    if config.validation_fraction >= 1.0:
        raise ValueError(f"validation_fraction: expected a number in [0, 1), got {config.validation_fraction!r}")
    if config.top_k is not None and config.top_k > config.pool_size:
        raise ValueError(f"top_k: expected at most pool_size ({config.pool_size}), got {config.top_k}")
    if config.max_length < 2:
        raise ValueError(f"max_length: expected at least 2 (CLS and one token), got {config.max_length}")
    if config.backbone is not None and (not isinstance(config.backbone, str) or not config.backbone.strip()):
        raise ValueError(f"backbone: expected a non-empty name or path, got {config.backbone!r}")
    if config.benchmark in ("tensor_file", "image_folder") and not config.data:
        raise ValueError(f"data: benchmark {config.benchmark!r} needs a path (--data), got {config.data!r}")
    if config.method in REPLAY_METHODS and config.train_mask == "task":
        raise ValueError(
            f"train_mask: method {config.method!r} replays old classes, so it needs 'seen' or 'all', got 'task'"
        )
    if not isinstance(config.extra, dict):
        raise ValueError(f"extra: expected a dict, got {type(config.extra).__name__}")
