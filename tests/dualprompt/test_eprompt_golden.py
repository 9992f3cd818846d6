"""The 34 golden E-prompt cases recorded from the DualPrompt port (fp64), both prefix layouts, on every CPU
backend: ids exact, gathered prompts bit-exact, values, loss and gradients within rtol 1e-10, atol 1e-12."""

from pathlib import Path

import pytest
import torch

from l2p_fast.dualprompt import FusedEPrompt

VECTORS = Path(__file__).parents[1] / "vectors" / "dualprompt_eprompt.pt"
CASES = torch.load(VECTORS, weights_only=True)["cases"]
VALUES = ("similarity", "selected_key", "prompt_key_norm", "x_embed_norm", "reduce_sim")
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _check_case(case: dict, backend: str, layout: str) -> None:
    tag = "permute" if layout == "permute" else "upstream"
    module = FusedEPrompt(**case["config"], layout=layout, backend=backend).double()
    module.load_state_dict({"prompt": case["prompt"], "prompt_key": case["prompt_key"]})
    x_embed = case["x_embed"].clone().requires_grad_(True)
    cls_features = case["cls_features"]
    if cls_features is not None:
        cls_features = cls_features.clone().requires_grad_(True)
    out = module(x_embed, prompt_mask=case["prompt_mask"], cls_features=cls_features)
    expected = case["out"]
    assert torch.equal(out["prompt_idx"], expected["prompt_idx"])
    assert torch.equal(out["batched_prompt"], expected[f"batched_prompt_{tag}"])  # copies: bit-exact
    for key in VALUES:
        torch.testing.assert_close(out[key], expected[key], **TOL, msg=key)
    loss = (
        (out["batched_prompt"] * case["loss_weight_prompt"]).sum()
        + out["reduce_sim"]
        + (out["similarity"] * case["loss_weight_similarity"]).sum()
    )
    torch.testing.assert_close(loss, case[f"loss_{tag}"], **TOL)
    loss.backward()
    grads = {
        "prompt": module.prompt.grad,
        "prompt_key": module.prompt_key.grad,
        "x_embed": x_embed.grad,
        "cls_features": None if cls_features is None else cls_features.grad,
    }
    for key, want in case[f"grad_{tag}"].items():
        if want is None:
            assert grads[key] is None, key
        elif grads[key] is None:
            assert not want.any(), f"grad {key}: None where the port's is non-zero"
        else:
            torch.testing.assert_close(grads[key], want, **TOL, msg=f"grad {key}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.requires_backend("cpu"))])
@pytest.mark.parametrize("layout", ["permute", "port"])
def test_golden_eprompt(backend: str, layout: str) -> None:
    for case in CASES:
        _check_case(case, backend, layout)


@pytest.mark.requires_backend("triton")
@pytest.mark.parametrize("layout", ["permute", "port"])
def test_golden_eprompt_triton(layout: str) -> None:
    # the interpreter pays per program: every fourth case on the correct layout; on the port's, every other one
    # of the cases where the two layouts differ (prefix-tuning with B > 1)
    if layout == "permute":
        cases = CASES[::4]
    else:
        cases = [c for c in CASES if c["config"]["use_prefix_tune_for_e_prompt"] and c["B"] > 1][::2]
    for case in cases:
        _check_case(case, "triton", layout)


def test_layouts_differ_where_the_readme_says() -> None:
    differ = [c for c in CASES if not torch.equal(c["out"]["batched_prompt_upstream"], c["out"]["batched_prompt_permute"])]
    assert len(differ) == 10
    assert all(c["config"]["use_prefix_tune_for_e_prompt"] and c["B"] > 1 for c in differ)
