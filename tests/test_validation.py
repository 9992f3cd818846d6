"""Bad input raises a clear error naming the argument, the expected and the actual value."""

import pytest
import torch

from l2p_fast import FusedPromptPool


def _pool(**kwargs) -> FusedPromptPool:
    config = dict(length=2, embed_dim=8, prompt_pool=True, prompt_key=True, pool_size=4, top_k=2, backend="reference")
    config.update(kwargs)
    return FusedPromptPool(**config)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=0), r"top_k: expected a positive int, got 0"),
        (dict(top_k=5), r"top_k: expected 1 <= top_k <= pool_size=4, got 5"),
        (dict(pool_size=None), r"pool_size, top_k: prompt_pool=True needs both"),
        (dict(top_k=None), r"pool_size, top_k: prompt_pool=True needs both"),
        (dict(embedding_key="median"), r"embedding_key: expected one of .*'mean'.*got 'median'"),
        (dict(prompt_init="normal"), r"prompt_init: expected one of \('uniform', 'zero'\), got 'normal'"),
        (dict(prompt_key_init="ones"), r"prompt_key_init: expected one of .*got 'ones'"),
        (dict(backend="tpu"), r"backend: expected one of .*got 'tpu'"),
        (dict(length=0), r"length: expected a positive int, got 0"),
        (dict(embed_dim=2.5), r"embed_dim: expected a positive int, got 2.5"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _pool(**kwargs)


def test_bad_forward_inputs() -> None:
    pool = _pool()
    x = torch.randn(3, 5, 8)
    cases = [
        (dict(x_embed=torch.randn(3, 8)), ValueError, r"x_embed: expected a 3-D tensor \(B, N, D\), got shape \(3, 8\)"),
        (dict(x_embed=torch.randn(3, 5, 7)), ValueError, r"x_embed: expected last dim D = embed_dim = 8, got 7"),
        (dict(x_embed=torch.ones(3, 5, 8, dtype=torch.int64)), TypeError, r"x_embed: expected a floating-point tensor, got dtype torch.int64"),
        (dict(x_embed=[[1.0]]), TypeError, r"x_embed: expected a torch.Tensor, got list"),
        (dict(cls_features=torch.randn(2, 8)), ValueError, r"cls_features: expected shape \(B, D\) = \(3, 8\), got \(2, 8\)"),
        (dict(cls_features=torch.randn(3, 9)), ValueError, r"cls_features: expected shape .* got \(3, 9\)"),
        (dict(cls_features=torch.ones(3, 8, dtype=torch.int32)), TypeError, r"cls_features: expected a floating-point"),
        (dict(prompt_mask=torch.zeros(3, 2)), TypeError, r"prompt_mask: expected an integer tensor of prompt ids, got dtype torch.float32"),
        (dict(prompt_mask=torch.zeros(3, 2, dtype=torch.bool)), TypeError, r"prompt_mask: expected an integer tensor"),
        (dict(prompt_mask=torch.zeros(2, 2, dtype=torch.int64)), ValueError, r"prompt_mask: expected shape \(B, K'\) with B = 3 and K' >= 1, got \(2, 2\)"),
        (dict(prompt_mask=torch.zeros(3, dtype=torch.int64)), ValueError, r"prompt_mask: expected shape"),
        (dict(prompt_mask=torch.tensor([[0, 4]] * 3)), ValueError, r"prompt_mask: expected ids in \[0, pool_size=4\), got values in \[0, 4\]"),
        (dict(prompt_mask=torch.tensor([[-1, 0]] * 3)), ValueError, r"prompt_mask: expected ids in \[0, pool_size=4\), got values in \[-1, 0\]"),
        (dict(x_embed=torch.randn(3, 5, 8, device="meta")), ValueError, r"x_embed: expected a tensor on the parameters' device cpu, got meta"),
        (dict(cls_features=torch.randn(3, 8, device="meta")), ValueError, r"cls_features: expected a tensor on the parameters' device cpu, got meta"),
        (dict(prompt_mask=torch.zeros(3, 2, dtype=torch.int64, device="meta")), ValueError, r"prompt_mask: expected a tensor on the parameters' device"),
        (dict(x_embed=torch.randn(0, 5, 8)), ValueError, r"x_embed: expected B >= 1 and N >= 1, got shape \(0, 5, 8\)"),
    ]
    for overrides, error, match in cases:
        args = dict(x_embed=x, prompt_mask=None, cls_features=None)
        args.update(overrides)
        with pytest.raises(error, match=match):
            pool(args.pop("x_embed"), **args)


def test_validation_runs_before_any_backend(monkeypatch) -> None:
    from l2p_fast import dispatch

    def fail(*args, **kwargs):
        raise AssertionError("a backend was resolved before validation")

    monkeypatch.setattr(dispatch, "resolve", fail)
    monkeypatch.setattr(dispatch, "implementation", fail)
    with pytest.raises(ValueError, match="x_embed"):
        _pool()(torch.randn(3, 8))
    with pytest.raises(AssertionError, match="resolved before validation"):
        _pool()(torch.randn(3, 5, 8))  # valid input: the backend is looked up (the patch is effective)


def test_ids_are_checked_only_where_it_costs_no_sync(monkeypatch) -> None:
    from l2p_fast import validation

    bad = torch.tensor([[0, 7]])
    with pytest.raises(ValueError, match=r"prompt_mask: expected ids in \[0, pool_size=4\), got values in \[0, 7\]"):
        validation.check_ids("prompt_mask", bad, "pool_size", 4)
    validation.check_ids("prompt_mask", bad.to("meta"), "pool_size", 4)  # not on the CPU: skipped (clamped later)
    assert validation.ids_unchecked(bad.to("meta")) and not validation.ids_unchecked(bad)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert validation.ids_unchecked(bad)
    validation.check_ids("prompt_mask", bad, "pool_size", 4)  # under torch.compile: skipped


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"keys": torch.randn(5, 8)}, "keys: expected shape (6, 8)"),
        ({"prompt": torch.randn(6, 2, 9)}, "prompt: expected (M, Lp, D) with D = 8"),
        ({"top_k": 7}, "top_k: expected 1 <= top_k <= M = 6"),
        ({"query_mode": 3}, "cls_features: expected shape (3, 8)"),
        ({"query_mode": 5}, "query_mode: expected 0, 1, 2 or 3, got 5"),
        ({"prompt_mask": torch.zeros(2, 2, dtype=torch.int64)}, "prompt_mask: expected shape (B = 3"),
        ({"prompt_mask": torch.zeros(3, 2)}, "prompt_mask: expected integer ids"),
        ({"x_embed": torch.randn(3, 8)}, "x_embed: expected (B, N, D)"),
        ({"x_embed": torch.ones(3, 4, 8, dtype=torch.int32)}, "x_embed: expected a floating-point tensor"),
        ({"keys": torch.randn(6, 8, device="meta")}, "keys: expected device cpu, got meta"),
        ({"frequency": torch.zeros(5)}, "frequency: expected shape (M,) = (6,), got (5,)"),
        ({"frequency": torch.zeros(6, device="meta")}, "frequency: expected device cpu, got meta"),
        ({"vote_counts": torch.zeros(6, 1, dtype=torch.int64)}, "vote_counts: expected shape (M,) = (6,), got (6, 1)"),
    ],
)
def test_pool_op_arguments(change: dict, message: str) -> None:
    from l2p_fast.validation import validate_pool_op

    args = {"x_embed": torch.randn(3, 4, 8), "prompt": torch.randn(6, 2, 8), "keys": torch.randn(6, 8),
            "cls_features": None, "prompt_mask": None, "query_mode": 0, "top_k": 2}
    validate_pool_op(**args)
    args.update(change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_pool_op(**args)


def test_selection_input_dtypes() -> None:
    from l2p_fast.validation import validate_pool_op

    args = {"x_embed": torch.randn(3, 4, 8), "prompt": torch.randn(6, 2, 8), "keys": torch.randn(6, 8),
            "cls_features": None, "prompt_mask": None, "query_mode": 0, "top_k": 2}
    with pytest.raises(TypeError, match="frequency: expected a floating-point tensor, got torch.int64"):
        validate_pool_op(**args, frequency=torch.zeros(6, dtype=torch.int64))
    with pytest.raises(TypeError, match="vote_counts: expected an integer tensor, got torch.float32"):
        validate_pool_op(**args, vote_counts=torch.zeros(6))
    validate_pool_op(**args, frequency=torch.zeros(6, dtype=torch.float64), vote_counts=torch.zeros(6, dtype=torch.int32))


def test_prepend_op_arguments() -> None:
    from l2p_fast.validation import validate_prepend_op

    validate_prepend_op(torch.randn(2, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match=r"prompt: expected \(Lp, D\) with D = 8, got shape \(2, 7\)"):
        validate_prepend_op(torch.randn(2, 7), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match=r"x_embed: expected \(B, N, D\)"):
        validate_prepend_op(torch.randn(2, 8), torch.randn(4, 8))


def test_backend_names_and_query_codes_come_from_their_tables() -> None:
    from l2p_fast import dispatch, modes, validation

    assert validation.BACKENDS == ("auto", *dispatch.BACKENDS)
    # the C++ and Triton kernels switch on these integer codes: they are fixed
    assert modes.QUERY_MODES == {"mean": 0, "max": 1, "mean_max": 2, "cls": 1} and modes.QUERY_FROM_CLS == 3
    assert validation.QUERY_CODES == (0, 1, 2, 3)
