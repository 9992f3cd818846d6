"""Autograd behaviour the backends agree on, and the documented differences (l2p_fast/ops/pool.py docstring):
forward-mode AD, gradients of inputs no used output depends on, in-place edits between forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

from l2p_fast import FusedPromptPool, dispatch
from l2p_fast.ops.assemble import assemble
from l2p_fast.testing import clone_pool

FUSED = ("cpu", "triton")
CONFIG = dict(length=2, embed_dim=8, prompt_pool=True, prompt_key=True, pool_size=5, top_k=2)


def require(backend: str, op: str = "pool_forward") -> None:
    reason = dispatch.unavailable_reason(backend, "cpu", op)
    if reason is not None:
        pytest.skip(f"backend={backend!r} cannot run {op} on cpu: {reason}")


def pools(backend: str, seed: int = 0, **overrides) -> tuple[FusedPromptPool, FusedPromptPool]:
    config = {**CONFIG, **overrides}
    torch.manual_seed(seed)
    module = FusedPromptPool(**config, backend=backend)
    return module, clone_pool(module, "reference")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("prompt_pool", [True, False])
def test_forward_mode_ad_raises_a_clear_error_naming_the_reference(backend: str, prompt_pool: bool) -> None:
    require(backend)
    module, twin = pools(backend, prompt_pool=prompt_pool)
    x = torch.randn(3, 4, 8)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.randn_like(x))
        tangent = forward_ad.unpack_dual(twin(dual)["prompted_embedding"]).tangent
        assert tangent is not None  # the reference supports it
        if backend == "cpu" and not prompt_pool:
            return  # non-pool mode on 'cpu' is the reference's cat
        with pytest.raises(RuntimeError, match=r"no forward-mode AD.*backend='reference'"):
            module(dual)
    module(x)  # outside a dual level nothing is refused


def test_triton_assembly_refuses_forward_mode_ad() -> None:
    require("triton", "assemble")
    x, prompt, cls = torch.randn(2, 3, 8), torch.randn(4, 2, 8), torch.randn(1, 1, 8)
    idx = torch.tensor([[0, 3], [2, 2]])
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(prompt, torch.randn_like(prompt))
        with pytest.raises(RuntimeError, match=r"Triton assembly \(backend='triton'\) has no forward-mode AD"):
            assemble(x, dual, idx, cls, None, backend="triton")


def _grads(module: FusedPromptPool, x: torch.Tensor, cls: torch.Tensor, used: tuple[str, ...]) -> dict:
    x, cls = x.clone().requires_grad_(True), cls.clone().requires_grad_(True)
    out = module(x, cls_features=cls)
    loss = sum(out[key].float().square().sum() for key in used)
    inputs = {"x_embed": x, "cls_features": cls, "prompt": module.prompt, "prompt_key": module.prompt_key}
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return dict(zip(inputs, grads, strict=True))


USED = (("prompted_embedding",), ("reduce_sim",), ("similarity",))
# outputs that reach the keys but not the query, or the query but not the keys
ONE_SIDED = (("selected_key",), ("prompt_norm",), ("x_embed_norm",))
TRITON_ONE_SIDED = pytest.mark.xfail(
    strict=True,
    reason="l2p_fast/ops/pool.py _triton_pool_forward_backward returns both the keys' and the query's gradient "
    "(zeros) when any similarity output is used",
)
CASES = [pytest.param(backend, used, id=f"{backend}-{'+'.join(used)}") for backend in FUSED for used in USED] + [
    pytest.param(
        backend, used, id=f"{backend}-{'+'.join(used)}", marks=[TRITON_ONE_SIDED] if backend == "triton" else []
    )
    for backend in FUSED
    for used in ONE_SIDED
]


@pytest.mark.parametrize(("backend", "used"), CASES)
@pytest.mark.parametrize("embedding_key", ["cls", "mean"])
def test_gradients_of_unreached_inputs(backend: str, used: tuple[str, ...], embedding_key: str) -> None:
    """Every backend: None for an input no used output depends on, the reference's gradient elsewhere."""
    require(backend)
    module, twin = pools(backend, seed=3, embedding_key=embedding_key)
    x, cls = torch.randn(4, 3, 8), torch.randn(4, 8)
    got, expected = _grads(module, x, cls, used), _grads(twin, x, cls, used)
    assert any(g is None for g in expected.values())  # the case reaches only part of the inputs
    for name, want in expected.items():
        if want is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], want, msg=name)


@pytest.mark.parametrize("backend", FUSED)
def test_in_place_edit_of_an_input_after_forward(backend: str) -> None:
    """An optimiser step on the keys between forward and backward: the reference saved the keys and refuses;
    the fused backends saved only their own outputs and give the gradient of the forward that ran."""
    require(backend)
    module, twin = pools(backend, seed=4)
    x = torch.randn(3, 4, 8)
    expected = torch.autograd.grad(twin(x)["reduce_sim"], twin.prompt_key)[0]
    for pool in (twin, module):
        out = pool(x)["reduce_sim"]
        with torch.no_grad():
            pool.prompt_key.mul_(-3.0)
        if pool is twin:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(out, pool.prompt_key)
        else:
            torch.testing.assert_close(torch.autograd.grad(out, pool.prompt_key)[0], expected)


@pytest.mark.parametrize("backend", FUSED)
def test_in_place_edit_of_a_saved_output_raises_everywhere(backend: str) -> None:
    require(backend)
    module, twin = pools(backend, seed=5)
    x = torch.randn(3, 4, 8, requires_grad=True)
    for pool in (twin, module):
        out = pool(x)
        loss = out["reduce_sim"]
        with torch.no_grad():
            out["x_embed_norm"].mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
