"""The shared test helpers of ``l2p_fast.testing``: the tolerance rule, the independent selection oracle, the skip
reasons of (backend, device) pairs and the input factories."""

import pytest
import torch

from l2p_fast.testing import (
    BACKEND_DEVICES,
    ERROR_FLOORS,
    FUSED_BACKEND_DEVICES,
    Interrupted,
    PoolCase,
    assert_close_to_truth,
    backend_skip_reason,
    interrupt_after,
    make_inputs,
    max_error,
    peak_memory_bytes,
    random_cases,
    select_by_rule,
)


def test_flash_rule_allows_twice_the_reference_error_and_no_more() -> None:
    truth = torch.linspace(-1, 1, 50, dtype=torch.float64)
    low = (truth + 1e-3).float()  # the same-precision reference is off by 1e-3
    assert_close_to_truth("ok", (truth - 2e-3).float(), low, truth)  # 2x its error
    with pytest.raises(AssertionError, match="error 3.0"):
        assert_close_to_truth("bad", (truth + 3e-3).float(), low, truth)


def test_flash_rule_floor_follows_the_tensors_own_dtype() -> None:
    truth = torch.linspace(-1, 1, 50, dtype=torch.float64)
    exact = truth.float()  # a reference with (almost) no error: only the floor remains
    assert_close_to_truth("fp32", exact + 0.5 * ERROR_FLOORS[torch.float32], exact, truth)
    with pytest.raises(AssertionError, match=r"fp32 \(torch.float32\)"):
        assert_close_to_truth("fp32", exact + 1e-4, exact, truth)  # passes a bf16 floor, not an fp32 one
    assert_close_to_truth("bf16", (truth + 1e-4).bfloat16(), truth.bfloat16(), truth)


def test_flash_rule_scale_and_mismatches() -> None:
    truth = torch.full((4,), 100.0, dtype=torch.float64)
    assert_close_to_truth("scaled", (truth + 5e-5).float(), truth.float(), truth)  # floor 1e-6 x 100
    with pytest.raises(AssertionError):
        assert_close_to_truth("scaled", (truth + 5e-5).float(), truth.float(), truth, scale=1.0)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close_to_truth("dtype", truth.float(), truth.double(), truth)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_truth("shape", truth.float(), truth[:3].float(), truth)
    nan = truth.clone()
    nan[1] = float("nan")
    assert max_error(nan, nan) == 0.0
    with pytest.raises(AssertionError, match="NaN"):
        max_error(truth, nan)


def test_select_by_rule_ties_go_to_the_lower_id() -> None:
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.9], [0.1, 0.1, 0.1, 0.1]])
    assert select_by_rule(sim, 3, batchwise=False).tolist() == [[1, 3, 0], [0, 1, 2]]
    # vote: rows pick [1, 3] and [0, 1] -> counts 1: 2, 0: 1, 3: 1 -> 1, then the tie 0/3 goes to 0
    assert select_by_rule(sim, 2, batchwise=True).tolist() == [[1, 0], [1, 0]]
    nan_first = select_by_rule(torch.tensor([[0.2, float("nan"), 0.9]]), 2, batchwise=False)
    assert nan_first.tolist() == [[1, 2]]  # NaN ranks as the largest, as torch.topk


def test_backend_pairs_and_skip_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(FUSED_BACKEND_DEVICES) == {pair for pair in BACKEND_DEVICES if pair[0] != "reference"}
    assert {device for _, device in BACKEND_DEVICES} == {"cpu", "cuda"}
    assert backend_skip_reason("reference", "cpu") is None
    if not torch.cuda.is_available():
        assert backend_skip_reason("cuda", "cuda") == "no CUDA device"
        assert backend_skip_reason("triton", "cuda") == "no CUDA device"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in backend_skip_reason("triton", "cpu")
    assert "'cuda'" in backend_skip_reason("cuda", "cpu")  # the dispatcher's own reason


def test_random_cases_cover_the_odd_sizes() -> None:
    cases = random_cases(60, seed=0)
    assert {c.embedding_key for c in cases} == {"mean", "max", "mean_max", "cls"}
    assert any(c.batch == 1 for c in cases) and any(c.top_k == 1 for c in cases)
    assert any(c.top_k == c.pool_size > 1 for c in cases) and any(c.width == 123 for c in cases)
    assert all(1 <= c.top_k <= c.pool_size for c in cases)
    assert any(c.non_contiguous for c in cases) and any(c.duplicate_keys for c in cases)


def test_make_inputs_fresh_non_contiguous_and_masked() -> None:
    case = PoolCase(batch=3, tokens=5, width=7, pool_size=4, top_k=2, use_cls=True, use_mask=True,
                    non_contiguous=True, dtype=torch.bfloat16)
    a, b = make_inputs(case, seed=1), make_inputs(case, seed=2)
    assert a["x_embed"].shape == (3, 5, 7) and not a["x_embed"].is_contiguous()
    assert a["x_embed"].dtype == a["cls_features"].dtype == torch.bfloat16
    assert not torch.equal(a["x_embed"], b["x_embed"]) and a["x_embed"].std() > 0.5
    mask = a["prompt_mask"]
    assert mask.shape == (3, 2) and mask.dtype == torch.int64 and bool(((mask >= 0) & (mask < 4)).all())
    assert torch.equal(make_inputs(case, seed=1)["x_embed"], a["x_embed"])  # seeded


def test_tiny_models() -> None:
    pytest.importorskip("timm", reason="timm is not installed")
    from l2p_fast.testing import tiny_bert, tiny_vit

    vit = tiny_vit(seed=3)
    assert not vit.training and vit.cls_token.abs().mean() > 0.5  # a non-trivial CLS
    assert torch.equal(tiny_vit(seed=3).pos_embed, vit.pos_embed)
    assert tiny_vit(class_token=False, global_pool="avg").cls_token is None
    pytest.importorskip("transformers", reason="transformers is not installed")
    bert = tiny_bert(hidden_act="relu")
    assert bert.config.hidden_size == 24 and bert.config.hidden_act == "relu"
    assert not any(p.requires_grad for p in bert.parameters()) and not bert.training


def test_peak_memory_bytes_counts_what_the_step_allocates() -> None:
    small = peak_memory_bytes(lambda: torch.empty(1_000, dtype=torch.float32).fill_(1.0))
    large = peak_memory_bytes(lambda: torch.empty(1_000_000, dtype=torch.float32).fill_(1.0))
    assert small is not None and large is not None
    assert large >= 4_000_000 > small


def test_interrupt_after_raises_at_that_step_only() -> None:
    hook = interrupt_after(3)
    hook(1)
    hook(2)
    with pytest.raises(Interrupted, match="after step 3"):
        hook(3)
