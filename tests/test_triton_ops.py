"""The Triton torch.library ops: opcheck of every op, torch.compile parity, determinism, availability, errors."""

import pytest
import torch

from l2p_fast import ops
from l2p_fast.backends import triton as triton_backend
from l2p_fast.dispatch import unavailable_reason
from l2p_fast.testing import PoolCase, clone_pool, forward_and_grads, make_inputs, make_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = unavailable_reason("triton", DEVICE)
needs_triton = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")


def _leaf(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(True)


@needs_triton
@pytest.mark.parametrize("variant", ["mean_max-vote", "cls-mask"])
def test_opcheck_pool_forward(variant: str) -> None:
    x, prompt, keys = _leaf(3, 5, 20), _leaf(6, 2, 20), _leaf(6, 20)
    if variant == "mean_max-vote":
        args = (x, prompt, keys, None, None, 2, 3, True)
    else:
        mask = torch.tensor([[5, 0], [1, 1], [2, 4]], device=DEVICE)
        args = (x, prompt, keys, _leaf(3, 20), mask, 3, 2, False)
    torch.library.opcheck(torch.ops.l2p_fast.triton_pool_forward.default, args)


@needs_triton
def test_opcheck_prepend() -> None:
    torch.library.opcheck(torch.ops.l2p_fast.triton_prepend.default, (_leaf(3, 9), _leaf(2, 4, 9, dtype=torch.bfloat16)))


@needs_triton
def test_opcheck_backward_ops() -> None:
    batch, tokens, width, pool_size, k, length = 3, 4, 12, 5, 2, 2
    x, prompt, keys = torch.randn(batch, tokens, width), torch.randn(pool_size, length, width), torch.randn(pool_size, width)
    outs = ops.triton_pool_forward(x.to(DEVICE), prompt.to(DEVICE), keys.to(DEVICE), None, None, 2, k, False)
    prompt_norm, x_norm, _, _, _, out, idx, key_sumsq, query_sumsq, argmax = outs
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.l2p_fast.triton_grad_prompt.default, (grad_out, idx, pool_size, length, torch.float32))
    grads = (torch.randn_like(prompt_norm), torch.randn_like(x_norm), torch.randn(batch, pool_size, device=DEVICE),
             torch.randn(batch, k, width, device=DEVICE), torch.randn((), device=DEVICE))
    saved = (idx, prompt_norm, x_norm, key_sumsq, query_sumsq)
    torch.library.opcheck(torch.ops.l2p_fast.triton_grad_similarity.default, (*grads, *saved, torch.float32))
    torch.library.opcheck(torch.ops.l2p_fast.triton_grad_similarity.default,
                          (None, None, grads[2], None, grads[4], *saved, torch.bfloat16))
    grad_query = torch.randn_like(x_norm)
    torch.library.opcheck(torch.ops.l2p_fast.triton_grad_x.default,
                          (grad_out, grad_query, argmax, 2, tokens, k * length, torch.float32))
    torch.library.opcheck(torch.ops.l2p_fast.triton_grad_x.default,
                          (None, grad_query, argmax, 1, tokens, k * length, torch.float16))


@needs_triton
def test_compile_fullgraph_parity() -> None:
    """torch.compile(fullgraph=True) of the module: same outputs and gradients as eager."""
    case = PoolCase(batch=3, tokens=5, width=20, pool_size=6, top_k=3, length=2, batchwise=True,
                    embedding_key="mean_max")
    pool = make_pool(case, backend="triton", device=DEVICE, seed=0)
    inputs = make_inputs(case, device=DEVICE, seed=1)
    out, grads, weights = forward_and_grads(pool, inputs)
    twin = clone_pool(pool, "triton")
    compiled = torch.compile(twin, fullgraph=True)
    x_embed = inputs["x_embed"].clone().requires_grad_(True)
    out_c = compiled(x_embed)
    loss = sum((out_c[k].double() * w.double()).sum() for k, w in weights.items())
    loss.backward()
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(out_c[key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert torch.equal(out_c["prompt_idx"], out["prompt_idx"])
    assert torch.equal(out_c["prompted_embedding"], out["prompted_embedding"])
    torch.testing.assert_close(x_embed.grad, grads["x_embed"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(twin.prompt.grad, grads["prompt"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(twin.prompt_key.grad, grads["prompt_key"], rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("use_mask", [False, True])
def test_backward_is_deterministic(use_mask: bool) -> None:
    """Two backward passes on identical inputs give bit-identical gradients (duplicate ids included)."""
    case = PoolCase(batch=7, tokens=5, width=33, pool_size=6, top_k=3, length=2, batchwise=True,
                    embedding_key="max", use_mask=use_mask, learnable_key=False)
    pool = make_pool(case, backend="triton", device=DEVICE, seed=0)
    inputs = make_inputs(case, device=DEVICE, seed=1)
    first, grads_a, weights = forward_and_grads(pool, inputs)
    assert (first["prompt_idx"] == first["prompt_idx"][:1]).all() or use_mask  # the vote: every row the same ids
    _, grads_b, _ = forward_and_grads(pool, inputs, weights)
    for key, grad in grads_a.items():
        if grad is not None:
            assert torch.equal(grad, grads_b[key]), key


@needs_triton
def test_cls_query_token_gradient_is_the_token_slice() -> None:
    case = PoolCase(batch=2, tokens=4, width=8, pool_size=4, top_k=2, length=3, embedding_key="cls", use_cls=True)
    pool = make_pool(case, backend="triton", device=DEVICE, seed=0)
    inputs = make_inputs(case, device=DEVICE, seed=1)
    out, grads, weights = forward_and_grads(pool, inputs)
    assert torch.equal(grads["x_embed"], weights["prompted_embedding"][:, 6:])
    assert grads["cls_features"] is not None and grads["cls_features"].abs().sum() > 0


def test_unavailable_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in triton_backend.unavailable_reason("triton", "cpu")
    assert "'mps'" in triton_backend.unavailable_reason("triton", "mps")
    if not torch.cuda.is_available():
        assert "no CUDA device" in triton_backend.unavailable_reason("triton", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = None if triton_backend.TRITON_FOUND else "the triton package is not installed (pip install triton)"
    assert triton_backend.unavailable_reason("triton", "cpu") == expected


def test_auto_on_cpu_never_picks_triton() -> None:
    from l2p_fast import dispatch

    assert "triton" not in dispatch.AUTO_PREFERENCE["cpu"]
    assert dispatch.resolve("auto", "cpu")[0] != "triton"


@needs_triton
@pytest.mark.parametrize("query_mode", [2, 3])  # max + 2·mean covers both reductions
def test_gradcheck_fp64(query_mode: int) -> None:
    """fp64 gradcheck of every float output of the forward op (ids fixed by well separated similarities)."""
    torch.manual_seed(query_mode)
    x, prompt, keys = _leaf(2, 3, 4, dtype=torch.float64), _leaf(3, 2, 4, dtype=torch.float64), _leaf(3, 4, dtype=torch.float64)
    extra = (_leaf(2, 4, dtype=torch.float64),) if query_mode == 3 else ()

    def run(x, prompt, keys, *cls):
        outs = ops.triton_pool_forward(x, prompt, keys, cls[0] if cls else None, None, query_mode, 2, False)
        return outs[:6]

    assert torch.autograd.gradcheck(run, (x, prompt, keys, *extra), eps=1e-6, atol=1e-6, fast_mode=True)


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
        triton_backend.check_pool_args(**args)
