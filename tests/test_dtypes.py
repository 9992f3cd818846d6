"""fp32, bf16 and fp16 inputs on every backend and device (the ``backend_device`` fixture): similarities computed
in fp32, outputs promoted as torch.cat would, and the values and gradients of an fp32 run on the upcast inputs."""

import pytest
import torch

from l2p_fast.testing import PoolCase, assert_close_to_truth, clone_pool, make_inputs, make_pool


def _upcast(inputs: dict) -> dict:
    return {k: None if v is None else (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("embedding_key", ["mean", "mean_max", "cls"])
def test_low_precision_inputs(backend_device: tuple[str, str], dtype: torch.dtype, embedding_key: str) -> None:
    backend, device = backend_device
    case = PoolCase(batch=5, tokens=11, width=24, pool_size=8, top_k=3, dtype=dtype, embedding_key=embedding_key,
                    use_cls=True)
    pool = make_pool(case, backend=backend, device=device, seed=0)
    inputs = make_inputs(case, device=device, seed=1)
    out = pool(**inputs)
    for key in ("prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim"):
        assert out[key].dtype == torch.float32, key
    assert out["prompted_embedding"].dtype == torch.float32  # cat(fp32 prompts, low-precision tokens)
    # the same values as an fp64 run on the (exactly representable) upcast inputs, to fp32 rounding
    truth_pool = clone_pool(pool, "reference").double()
    expected = truth_pool(**_upcast(inputs))
    assert torch.equal(out["prompt_idx"], expected["prompt_idx"])
    torch.testing.assert_close(out["similarity"].double(), expected["similarity"], rtol=1e-6, atol=1e-6)
    assert torch.equal(out["prompted_embedding"].double(), expected["prompted_embedding"])
    out["reduce_sim"].backward()
    expected["reduce_sim"].backward()
    assert pool.prompt_key.grad.dtype == torch.float32
    torch.testing.assert_close(pool.prompt_key.grad.double(), truth_pool.prompt_key.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients(backend_device: tuple[str, str], dtype: torch.dtype) -> None:
    """A bf16/fp16 x_embed gets its gradient in its own dtype; the fp32 prompts and keys get fp32 gradients. Each
    within flash-attention's rule of the fp64 gradient (the reference run in the same dtypes sets the bound), and
    the x_embed gradient within two ulps of its dtype at its scale (the token-slice and query-path gradients are
    added in that dtype: two roundings)."""
    backend, device = backend_device
    case = PoolCase(batch=4, tokens=9, width=16, pool_size=6, top_k=3, length=2, embedding_key="mean_max",
                    dtype=dtype)
    pool = make_pool(case, backend=backend, device=device, seed=0)
    x = make_inputs(case, device=device, seed=1)["x_embed"]
    runs = []
    for module, x_run in ((pool, x), (clone_pool(pool, "reference"), x),
                          (clone_pool(pool, "reference").double(), x.double())):
        leaf = x_run.detach().clone().requires_grad_(True)
        out = module(leaf)
        weight = torch.linspace(-1, 1, out["prompted_embedding"].numel(), device=device)
        loss = (out["prompted_embedding"] * weight.view_as(out["prompted_embedding"])).sum()
        (loss + out["reduce_sim"] * 3 + out["similarity"].square().sum()).backward()
        runs.append((leaf.grad, module.prompt.grad, module.prompt_key.grad))
    got, low, truth = runs
    assert got[0].dtype == dtype and got[0].shape == x.shape
    assert got[1].dtype == got[2].dtype == torch.float32
    for name, g, lo, t in zip(("x_embed", "prompt", "prompt_key"), got, low, truth, strict=True):
        assert_close_to_truth(f"grad {name}", g, lo, t)
    ulp = torch.finfo(dtype).eps * truth[0].abs().max().item()
    assert (got[0].double() - truth[0]).abs().max().item() <= 2 * ulp
