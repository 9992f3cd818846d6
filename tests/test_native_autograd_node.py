"""The native pool's backward node (csrc/cpu/pool_autograd.cpp) inside PyTorch's autograd: graph shape,
retained and released graphs, in-place checks on saved outputs, anomaly mode's forward trace, trimmed
backward (``inputs=``), saved-tensor hooks, no-grad and inference modes, and the clear error for
forward-mode AD."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from l2p_fast.testing import PoolCase, clone_pool, make_inputs, make_pool


@pytest.fixture
def device(native_backend_device: tuple[str, str]) -> str:
    """'cpu' or 'cuda': the native backend of that name on tensors of that device (one autograd node for both)."""
    return native_backend_device[1]

CASE = PoolCase(batch=3, tokens=5, width=8, pool_size=4, top_k=2, embedding_key="cls", use_cls=True)


def _setup(device: str, backend: str | None = None, seed: int = 5):
    """A pool of CASE on ``backend`` (default: the native backend of ``device``) and its inputs on ``device``."""
    pool = clone_pool(make_pool(CASE, device=device, seed=seed), backend or device)
    return pool, make_inputs(CASE, device=device, seed=seed)


def _loss(out: dict) -> torch.Tensor:
    return (out["prompted_embedding"] ** 2).sum() + out["x_embed_norm"].sum() - out["reduce_sim"]


def _grads(device: str, backend: str | None = None, retain_twice: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    pool, inputs = _setup(device, backend)
    loss = _loss(pool(inputs["x_embed"], cls_features=inputs["cls_features"]))
    loss.backward(retain_graph=retain_twice)
    if retain_twice:
        loss.backward()
    return pool.prompt.grad, pool.prompt_key.grad


def test_graph_has_one_node_with_an_edge_per_tensor_input(device: str) -> None:
    pool, inputs = _setup(device)
    x = inputs["x_embed"].requires_grad_(True)
    out = pool(x, cls_features=inputs["cls_features"])
    node = out["prompted_embedding"].grad_fn
    assert node.name() == "l2p_fast::PoolForwardBackward"
    for key in ("x_embed_norm", "prompt_norm", "similarity", "selected_key", "reduce_sim"):
        assert out[key].grad_fn is node
    assert not out["prompt_idx"].requires_grad and out["prompt_idx"].grad_fn is None
    # edges: x_embed (a leaf), cls_features (no grad: no edge), prompt, keys (leaves)
    edges = [fn for fn, _ in node.next_functions]
    assert len(edges) == 4 and edges[1] is None
    assert [type(fn).__name__ for i, fn in enumerate(edges) if i != 1] == ["AccumulateGrad"] * 3


def test_retained_graph_runs_twice_and_a_released_one_refuses(device: str) -> None:
    once, twice = _grads(device), _grads(device, retain_twice=True)
    for single, double in zip(once, twice, strict=True):
        torch.testing.assert_close(double, 2 * single)
    pool, inputs = _setup(device)
    loss = _loss(pool(inputs["x_embed"], cls_features=inputs["cls_features"]))
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_in_place_change_of_a_saved_output_is_detected(device: str) -> None:
    pool, inputs = _setup(device)
    out = pool(inputs["x_embed"], cls_features=inputs["cls_features"])
    loss = _loss(out)
    with torch.no_grad():
        out["x_embed_norm"].mul_(2.0)  # saved for the backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_anomaly_mode_names_the_forward_call_of_a_failing_backward(device: str) -> None:
    pool, inputs = _setup(device)
    with torch.autograd.detect_anomaly(check_nan=False):
        out = pool(inputs["x_embed"], cls_features=inputs["cls_features"])
        loss = _loss(out)
        with torch.no_grad():
            out["x_embed_norm"].add_(1.0)
        with pytest.warns(UserWarning, match="forward call that caused the error"):
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()


def test_trimmed_backward_matches_the_full_one(device: str) -> None:
    full_prompt, full_key = _grads(device)
    pool, inputs = _setup(device)
    loss = _loss(pool(inputs["x_embed"], cls_features=inputs["cls_features"]))
    (key_only,) = torch.autograd.grad(loss, [pool.prompt_key])
    torch.testing.assert_close(key_only, full_key)
    pool, inputs = _setup(device)
    _loss(pool(inputs["x_embed"], cls_features=inputs["cls_features"])).backward(inputs=[pool.prompt])
    assert pool.prompt_key.grad is None
    torch.testing.assert_close(pool.prompt.grad, full_prompt)


def test_saved_tensor_hooks_see_every_saved_tensor(device: str) -> None:
    expected = _grads(device, "reference")
    pool, inputs = _setup(device)
    packed, unpacked = [], []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.shape)
        return t.clone()

    def unpack(t: torch.Tensor) -> torch.Tensor:
        unpacked.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = _loss(pool(inputs["x_embed"], cls_features=inputs["cls_features"]))
    # the node saves x_norm, prompt_norm, q_sumsq, k_sumsq, idx and argmax (the loss's own ops save more)
    assert torch.Size([CASE.batch, CASE.top_k]) in packed  # idx
    assert torch.Size([CASE.pool_size]) in packed  # k_sumsq
    loss.backward()
    assert sorted(map(tuple, unpacked)) == sorted(map(tuple, packed))
    for got, want in zip((pool.prompt.grad, pool.prompt_key.grad), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_graph_outside_grad_mode(device: str, mode: str) -> None:
    pool, inputs = _setup(device)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        out = pool(inputs["x_embed"], cls_features=inputs["cls_features"])
    for value in out.values():
        if isinstance(value, torch.Tensor):
            assert value.grad_fn is None and not value.requires_grad
    with torch.no_grad():
        expected = clone_pool(pool, "reference")(inputs["x_embed"], cls_features=inputs["cls_features"])
    torch.testing.assert_close(out["prompted_embedding"], expected["prompted_embedding"])


def test_forward_mode_ad_raises_a_clear_error(device: str) -> None:
    pool, inputs = _setup(device)
    with fwAD.dual_level():
        x = fwAD.make_dual(inputs["x_embed"], torch.randn_like(inputs["x_embed"]))
        with pytest.raises(RuntimeError, match=r"no forward-mode AD.*backend='reference'"):
            pool(x, cls_features=inputs["cls_features"])
