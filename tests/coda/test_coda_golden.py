"""The 20 golden CODA-Prompt cases recorded from the original ``CodaPrompt.forward`` (fp64): prefixes, orthogonality
loss, loss and gradients (full M rows: the per-task slicing) within rtol 1e-10, atol 1e-12, on every backend, both
through ``FusedCodaPrompt`` and through the plain reference of ``l2p_fast.coda.reference``."""

from pathlib import Path

import pytest
import torch

from l2p_fast.coda import FusedCodaPrompt
from l2p_fast.coda import reference as ref

VECTORS = Path(__file__).parents[1] / "vectors" / "coda_prompt.pt"
CASES = torch.load(VECTORS, weights_only=True)["cases"]
TOL = {"rtol": 1e-10, "atol": 1e-12}
CPU_BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.requires_backend("cpu")),
    pytest.param("triton", marks=pytest.mark.requires_backend("triton")),
]


def _module(case: dict, backend: str) -> FusedCodaPrompt:
    cfg = case["config"]
    module = FusedCodaPrompt(cfg["emb_d"], cfg["n_tasks"], cfg["prompt_param"], key_dim=cfg["key_dim"],
                             backend=backend).double()
    module.task_count = case["task_count"]
    layer = case["layer"] if case["layer"] in module.e_layers else 0
    with torch.no_grad():
        for kind in ("p", "k", "a"):
            getattr(module, f"e_{kind}_{layer}").copy_(case["params"][f"e_{kind}"])
    return module


def _loss(case: dict, p_return, ortho) -> torch.Tensor:
    ek, ev = p_return
    return (ek * case["loss_weight_k"]).sum() + (ev * case["loss_weight_v"]).sum() + ortho


def _check(case: dict, backend: str) -> None:
    module = _module(case, backend)
    q = case["x_querry"].clone().requires_grad_(True)
    p_return, ortho, x_block = module(q, case["layer"], case["x_block"], train=case["train"])
    out = case["out"]
    assert x_block is case["x_block"]
    assert isinstance(ortho, torch.Tensor) and ortho.shape == ()
    want_ortho = out["ortho_loss"] if isinstance(out["ortho_loss"], torch.Tensor) else torch.zeros((), dtype=q.dtype)
    torch.testing.assert_close(ortho, want_ortho, **TOL, msg=f"{case['name']} ortho_loss")
    if out["p_return"] is None:
        assert p_return is None, case["name"]
        assert case["grad"] is None
        return
    for got, want, name in zip(p_return, out["p_return"], ("Ek", "Ev"), strict=True):
        assert got.shape == want.shape, (case["name"], name)
        torch.testing.assert_close(got, want, **TOL, msg=f"{case['name']} {name}")
    loss = _loss(case, p_return, ortho)
    torch.testing.assert_close(loss, case["loss"], **TOL, msg=f"{case['name']} loss")
    loss.backward()
    layer = case["layer"]
    grads = {"x_querry": q.grad, **{f"e_{k}": getattr(module, f"e_{k}_{layer}").grad for k in ("p", "k", "a")}}
    for key, want in case["grad"].items():
        got = grads[key] if grads[key] is not None else torch.zeros_like(want)
        torch.testing.assert_close(got, want, **TOL, msg=f"{case['name']} grad {key}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_golden_module(backend: str) -> None:
    for case in CASES:
        _check(case, backend)


def test_golden_plain_reference() -> None:
    """The equations alone (no module, no op): slicing, mix, split, orthogonality loss, gradients."""
    for case in CASES:
        if case["out"]["p_return"] is None:
            continue
        cfg = case["config"]
        pool, _, mu = cfg["prompt_param"]
        params = {k: v.clone().requires_grad_(True) for k, v in case["params"].items()}
        q = case["x_querry"].clone().requires_grad_(True)
        s, f = ref.task_rows(pool, cfg["n_tasks"], case["task_count"])
        assert (s, f) == (case["s"], case["f"])
        start = s if case["train"] else 0
        mixed = ref.coda_prompt(q, params["e_k"], params["e_a"], params["e_p"], start, f)
        sliced = [ref.slice_rows(params[k], start, f, True) for k in ("e_k", "e_a", "e_p")]
        ortho = ref.ortho_loss(*sliced, mu if case["train"] else 0.0)
        loss = _loss(case, ref.split_prefix(mixed), ortho)
        torch.testing.assert_close(loss, case["loss"], **TOL, msg=case["name"])
        loss.backward()
        for key, want in case["grad"].items():
            got = q.grad if key == "x_querry" else params[key].grad
            torch.testing.assert_close(got, want, **TOL, msg=f"{case['name']} grad {key}")


def test_vectors_cover_what_they_claim() -> None:
    """Odd Lp, a non-prompt layer, μ = 0 and μ > 0, earlier-task rows in training: the cases pin each."""
    assert len(CASES) == 20
    assert any(c["config"]["prompt_param"][1] % 2 for c in CASES)
    assert any(c["out"]["p_return"] is None for c in CASES)
    assert any(c["train"] and c["task_count"] > 0 for c in CASES)
    assert any(isinstance(c["out"]["ortho_loss"], torch.Tensor) for c in CASES)
    assert any(c["config"]["prompt_param"][2] == 0 for c in CASES)
