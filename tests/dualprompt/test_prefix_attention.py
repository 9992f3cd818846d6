"""Prefix attention (tokens by SDPA with log-sum-exp, prefix by hand, merged) against the port's concat + softmax
(the reference) and the 12 golden ``PreT_Attention`` cases; gradcheck, compile parity, determinism."""

from pathlib import Path

import pytest
import torch

from l2p_fast.dualprompt import attention
from l2p_fast.dualprompt.attention import PrefixAttention, prefix_attention
from l2p_fast.dualprompt.reference import prefix_attention as reference_attention

VECTORS = Path(__file__).parents[1] / "vectors" / "dualprompt_attention.pt"
CASES = torch.load(VECTORS, weights_only=True)["cases"]
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _inputs(batch: int, heads: int, tokens: int, prefix: int, head_dim: int, prefix_batch: int, dtype=torch.float64):
    shapes = [(batch, heads, tokens, head_dim)] * 3 + [(prefix_batch, heads, prefix, head_dim)] * 2
    return [(torch.randn(s, dtype=dtype) * 2).requires_grad_(True) for s in shapes]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_attention(case: dict) -> None:
    module = PrefixAttention(**case["config"]).double()
    params = case["params"]
    state = {"qkv.weight": params["qkv_weight"], "proj.weight": params["proj_weight"], "proj.bias": params["proj_bias"]}
    if params["qkv_bias"] is not None:
        state["qkv.bias"] = params["qkv_bias"]
    module.load_state_dict(state)
    x = case["x"].clone().requires_grad_(True)
    prefix = None if case["prefix"] is None else case["prefix"].clone().requires_grad_(True)
    out = module(x, prefix)
    torch.testing.assert_close(out, case["out"], **TOL)
    loss = (out * case["loss_weight_out"]).sum()
    torch.testing.assert_close(loss, case["loss"], **TOL)
    loss.backward()
    got = {
        "x": x.grad,
        "prefix": None if prefix is None else prefix.grad,
        "qkv_weight": module.qkv.weight.grad,
        "qkv_bias": None if module.qkv.bias is None else module.qkv.bias.grad,
        "proj_weight": module.proj.weight.grad,
        "proj_bias": module.proj.bias.grad,
    }
    for key, want in case["grad"].items():
        if want is None:
            assert got[key] is None, key
        else:
            torch.testing.assert_close(got[key], want, **TOL, msg=f"grad {key}")


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa-lse", "math"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 4, 8, 2), (3, 2, 5, 1, 4, 1), (1, 1, 1, 6, 3, 1)])
def test_random_against_concat(shape: tuple, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "fused_lse", lambda device_type: fused)
    torch.manual_seed(sum(shape))
    batch, heads, tokens, prefix, head_dim, prefix_batch = shape
    args = _inputs(batch, heads, tokens, prefix, head_dim, prefix_batch)
    out = prefix_attention(*args)
    want = reference_attention(*args, head_dim**-0.5)
    torch.testing.assert_close(out, want, **TOL)
    grad = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(want, args, grad), strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa-lse", "math"])
def test_gradcheck(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "fused_lse", lambda device_type: fused)
    torch.manual_seed(0)
    for prefix_batch in (1, 2):
        args = _inputs(2, 2, 3, 2, 4, prefix_batch)
        assert torch.autograd.gradcheck(lambda *t: prefix_attention(*t, scale=0.7), args)


def test_float32_close_to_fp64_truth() -> None:
    torch.manual_seed(1)
    args = _inputs(4, 3, 33, 5, 16, 4, dtype=torch.float32)
    out = prefix_attention(*args)
    truth = reference_attention(*[a.double() for a in args], 0.25)
    low = reference_attention(*args, 0.25)
    assert (out.double() - truth).abs().max() <= 2 * (low.double() - truth).abs().max() + 1e-6


def test_deterministic() -> None:
    torch.manual_seed(2)
    args = _inputs(3, 2, 9, 3, 8, 1, dtype=torch.float32)
    grad = torch.randn(3, 2, 9, 8)
    runs = [torch.autograd.grad(prefix_attention(*args), args, grad) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_compile_parity() -> None:
    torch.manual_seed(3)
    args = _inputs(2, 2, 5, 3, 4, 2)
    compiled = torch.compile(prefix_attention, fullgraph=True, backend="aot_eager")
    out, want = compiled(*args), prefix_attention(*args)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(want, args, grad), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bad_prefix_named() -> None:
    q = torch.randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match="prefix_k"):
        prefix_attention(q, q, q, torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    with pytest.raises(ValueError, match="both or neither"):
        prefix_attention(q, q, q, torch.randn(2, 2, 1, 4), None)
    with pytest.raises(ValueError, match="num_heads"):
        PrefixAttention(10, num_heads=3)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa-lse", "math"])
@pytest.mark.parametrize("needs", ["prefix", "prefix_v", "q", "kv"])
def test_partial_gradients(fused: bool, needs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only some inputs need a gradient (the first prefix layer of a frozen ViT: only the prefix): those gradients
    are the reference's, the others are not computed."""
    monkeypatch.setattr(attention, "fused_lse", lambda device_type: fused)
    torch.manual_seed(4)
    args = [a.detach() for a in _inputs(2, 3, 6, 3, 4, 1)]
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    wanted = {"prefix": ("prefix_k", "prefix_v"), "prefix_v": ("prefix_v",), "q": ("q",), "kv": ("k", "v")}[needs]
    for name, arg in zip(names, args, strict=True):
        arg.requires_grad_(name in wanted)
    out = prefix_attention(*args)
    want = reference_attention(*args, 0.5)
    torch.testing.assert_close(out, want, **TOL)
    grad = torch.randn_like(out)
    leaves = [a for a in args if a.requires_grad]
    for got, expected in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(want, leaves, grad), strict=True):
        torch.testing.assert_close(got, expected, **TOL)


def test_output_keeps_the_kernel_layout() -> None:
    """On the CPU the merged output is written into the fused kernel's (B, N, H, Dh) buffer, so the caller's
    ``transpose(1, 2).reshape(B, N, D)`` is a view, as after SDPA (no extra copy of the output)."""
    q, k, v = torch.randn(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4).unbind(0)  # as PrefixAttention's qkv split
    prefix = torch.randn(2, 2, 3, 2, 4)
    out = prefix_attention(q, k, v, prefix[0], prefix[1])
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.stride() == sdpa.stride()
    assert out.transpose(1, 2).reshape(2, 5, 12)._base is not None


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa-lse", "math"])
@pytest.mark.parametrize("prefix_batch", [1, 3])
def test_key_mask_against_concat(fused: bool, prefix_batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded tokens (key_mask False) get no weight, the prefix always; outputs and gradients as the masked concat;
    a fully padded row attends the prefix alone; no prefix: SDPA with the mask."""
    monkeypatch.setattr(attention, "fused_lse", lambda device_type: fused)
    torch.manual_seed(5)
    args = _inputs(3, 2, 6, 2, 4, prefix_batch)
    key_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [False] * 6])
    out = prefix_attention(*args, key_mask=key_mask)
    want = reference_attention(*args, 0.5, key_mask)
    torch.testing.assert_close(out, want, **TOL)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, args, grad)
    for g, expected in zip(got, torch.autograd.grad(want, args, grad), strict=True):
        torch.testing.assert_close(g, expected, **TOL)
    assert got[1][1, :, 3:].abs().max() == 0 and got[2][2].abs().max() == 0  # padded keys / values: no gradient
    q, k, v = (a[:2] for a in args[:3])
    mask = key_mask[:2]
    torch.testing.assert_close(prefix_attention(q, k, v, None, None, key_mask=mask),
                               reference_attention(q, k, v, None, None, 0.5, mask), **TOL)
    assert torch.autograd.gradcheck(lambda *t: prefix_attention(*t, key_mask=key_mask), args)


def test_bad_key_mask_named() -> None:
    q = torch.randn(2, 2, 3, 4)
    prefix = torch.randn(1, 2, 1, 4)
    with pytest.raises(ValueError, match=r"key_mask: expected a bool \(B, N\) = \(2, 3\)"):
        prefix_attention(q, q, q, prefix, prefix, key_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="key_mask"):
        prefix_attention(q, q, q, prefix, prefix, key_mask=torch.ones(2, 4, dtype=torch.bool))
