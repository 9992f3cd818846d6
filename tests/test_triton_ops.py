"""The Triton backend's availability rules and its launchers' argument errors (its values, gradients, opcheck,
gradcheck, compile parity and determinism: tests/test_backend_parity.py and tests/test_backend_ops.py)."""

import pytest
import torch

from l2p_fast import FusedPromptPool, dispatch
from l2p_fast.validation import validate_pool_op


def test_unavailable_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in dispatch.unavailable_reason("triton", "cpu")
    assert "'mps'" in dispatch.unavailable_reason("triton", "mps")
    if not torch.cuda.is_available():
        assert "no CUDA device" in dispatch.unavailable_reason("triton", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = None if dispatch.TRITON_FOUND else "the triton package is not installed (pip install triton)"
    assert dispatch.unavailable_reason("triton", "cpu") == expected


def test_auto_on_cpu_never_picks_triton() -> None:
    """Triton runs on CPU tensors only through its (slow) interpreter: auto never picks it there."""
    assert FusedPromptPool(backend="auto").resolved_backend("cpu") != "triton"


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
    ],
)
def test_bad_arguments_raise_before_any_launch(change: dict, message: str) -> None:
    args = {"x_embed": torch.randn(3, 4, 8), "prompt": torch.randn(6, 2, 8), "keys": torch.randn(6, 8),
            "cls_features": None, "prompt_mask": None, "query_mode": 0, "top_k": 2}
    args.update(change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_pool_op(**args)
