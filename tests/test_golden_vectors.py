"""The 48 golden cases recorded from the upstream ``Prompt`` module (float64), on every backend and device
(the ``backend_device`` fixture): ids exact, values and gradients to 1e-12."""

from pathlib import Path

import pytest
import torch

from l2p_fast import FusedPromptPool

VECTORS = Path(__file__).parent / "vectors" / "upstream_prompt_vectors.pt"
CASES = torch.load(VECTORS, weights_only=True)["cases"]


def _run(case: dict, backend: str, device: str):
    case = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in case.items()}
    pool = FusedPromptPool(**case["config"], backend=backend).double().to(device)
    pool.load_state_dict({"prompt": case["prompt"], "prompt_key": case["prompt_key"]})
    x_embed = case["x_embed"].clone().requires_grad_(True)
    cls_features = case["cls_features"]
    if cls_features is not None:
        cls_features = cls_features.clone().requires_grad_(True)
    out = pool(x_embed, prompt_mask=case["prompt_mask"], cls_features=cls_features)
    loss = (
        (out["prompted_embedding"] * case["loss_weight_prompted"]).sum()
        - 0.1 * out["reduce_sim"]
        + (out["similarity"] * case["loss_weight_similarity"]).sum()
    )
    loss.backward()
    grads = {
        "x_embed": x_embed.grad,
        "cls_features": None if cls_features is None else cls_features.grad,
        "prompt": pool.prompt.grad,
        "prompt_key": pool.prompt_key.grad,
    }
    return out, grads


@pytest.mark.parametrize("index", range(len(CASES)))
def test_golden_case(index: int, backend_device: tuple[str, str]) -> None:
    case = CASES[index]
    out, grads = _run(case, *backend_device)
    assert list(out) == list(case["out"])
    for key, expected in case["out"].items():
        if isinstance(expected, int):
            assert out[key] == expected
            continue
        assert out[key].device.type == backend_device[1], key
        if expected.dtype == torch.int64:
            assert torch.equal(out[key].cpu(), expected), key
        else:
            assert out[key].dtype == torch.float64
            torch.testing.assert_close(out[key].cpu(), expected, rtol=1e-12, atol=1e-12, msg=key)
    for key, expected in case["grad"].items():
        if expected is None:
            assert grads[key] is None or not grads[key].any(), key
        else:
            torch.testing.assert_close(grads[key].cpu(), expected, rtol=1e-12, atol=1e-12, msg=f"grad {key}")


def test_vectors_cover_every_embedding_key_and_masks() -> None:
    keys = {case["config"]["embedding_key"] for case in CASES}
    assert keys == {"mean", "max", "mean_max", "cls"}
    assert any(case["prompt_mask"] is not None for case in CASES)
    assert any(case["config"]["batchwise_prompt"] for case in CASES)
