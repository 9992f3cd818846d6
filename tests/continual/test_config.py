"""RunConfig: defaults per method and benchmark, validation messages, fingerprint."""

from __future__ import annotations

import pytest

from l2p_fast.continual.config import BENCHMARK_BUDGETS, METHOD_DEFAULTS, METHODS, RunConfig, resolve, validate_config


def test_resolve_fills_method_and_benchmark_defaults():
    cfg = resolve(RunConfig(method="seq"))
    assert cfg.lr == METHOD_DEFAULTS["seq"]["lr"] and cfg.train_mask == "seen"
    assert cfg.epochs == BENCHMARK_BUDGETS["wordnet20"]["epochs"]
    assert cfg.train_per_class == BENCHMARK_BUDGETS["wordnet20"]["train_per_class"]
    assert cfg.replay_batch_size == cfg.batch_size
    assert resolve(RunConfig(method="l2p")).train_mask == "task"
    explicit = resolve(RunConfig(method="l2p", lr=0.5, epochs=7, train_mask="all", train_per_class=3))
    assert (explicit.lr, explicit.epochs, explicit.train_mask, explicit.train_per_class) == (0.5, 7, "all", 3)
    assert set(METHOD_DEFAULTS) == set(METHODS)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("method", "finetune", r"method: expected one of .*'l2p'.* got 'finetune'"),
        ("benchmark", "mnist", r"benchmark: expected one of .* got 'mnist'"),
        ("epochs", 0, r"epochs: expected an integer >= 1 or None, got 0"),
        ("batch_size", 2.5, r"batch_size: expected an integer >= 1, got 2.5"),
        ("lr", -1.0, r"lr: expected a finite number > 0.0 or None, got -1.0"),
        ("lr", float("nan"), r"lr: expected a finite number"),
        ("top_k", 11, r"top_k: expected at most pool_size \(10\), got 11"),
        ("train_mask", "old", r"train_mask: expected one of"),
        ("head_type", "cls", r"head_type: expected one of"),
        ("device", "tpu", r"device: expected one of"),
        ("seed", -1, r"seed: expected an integer >= 0"),
        ("max_length", 1, r"max_length: expected at least 2"),
        ("backbone", " ", r"backbone: expected a non-empty name"),
    ],
)
def test_bad_values_name_argument_expected_and_actual(field, value, match):
    with pytest.raises(ValueError, match=match):
        validate_config(RunConfig(**{field: value}))


def test_bad_combinations():
    with pytest.raises(ValueError, match="data: benchmark 'tensor_file' needs a path"):
        validate_config(RunConfig(benchmark="tensor_file"))
    with pytest.raises(ValueError, match="train_mask: method 'er' replays old classes"):
        validate_config(RunConfig(method="er", train_mask="task"))
    with pytest.raises(TypeError, match="RunConfig"):
        validate_config({"method": "l2p"})


def test_dict_round_trip_and_fingerprint():
    cfg = resolve(RunConfig(method="ewc", seed=5))
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    # settings that do not change the numbers do not change the fingerprint
    assert RunConfig(progress=False, checkpoint_every=7, device="cpu").fingerprint() == RunConfig().fingerprint()
    assert RunConfig(seed=1).fingerprint() != RunConfig().fingerprint()
    # options of other methods are not part of a method's fingerprint
    assert RunConfig(method="seq", ewc_lambda=1.0).fingerprint() == RunConfig(method="seq").fingerprint()
    assert RunConfig(method="ewc", ewc_lambda=1.0).fingerprint() != RunConfig(method="ewc").fingerprint()
    assert RunConfig(method="er", top_k=2).fingerprint() == RunConfig(method="er").fingerprint()
    # the op backend is part of every prompt method's fingerprint (CODA-Prompt's too), of no other method's
    for method in ("l2p", "dualprompt", "coda-prompt"):
        assert RunConfig(method=method, backend="reference").fingerprint() != RunConfig(method=method).fingerprint()
    assert RunConfig(method="coda-prompt", top_k=2).fingerprint() == RunConfig(method="coda-prompt").fingerprint()
    assert RunConfig(method="seq", backend="reference").fingerprint() == RunConfig(method="seq").fingerprint()
    assert RunConfig(method="l2p", top_k=2).fingerprint() != RunConfig(method="l2p").fingerprint()
    assert RunConfig(method="l2p", buffer_per_class=3).fingerprint() == RunConfig(method="l2p").fingerprint()
    with pytest.raises(ValueError, match="unknown keys"):
        RunConfig.from_dict({"method": "l2p", "learning_rate": 1})
