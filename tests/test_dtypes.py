"""fp32, bf16 and fp16 inputs: similarities computed in fp32, outputs promoted as torch.cat would."""

import pytest
import torch

from l2p_fast.testing import PoolCase, make_inputs, make_pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("embedding_key", ["mean", "mean_max", "cls"])
def test_low_precision_inputs(dtype: torch.dtype, embedding_key: str) -> None:
    case = PoolCase(batch=5, tokens=11, width=24, pool_size=8, top_k=3, dtype=dtype, embedding_key=embedding_key,
                    use_cls=True)
    pool = make_pool(case, seed=0)
    inputs = make_inputs(case, seed=1)
    out = pool(**inputs)
    for key in ("prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim"):
        assert out[key].dtype == torch.float32, key
    assert out["prompted_embedding"].dtype == torch.float32  # cat(fp32 prompts, low-precision tokens)
    # the same values as an fp32 run on the (exactly representable) upcast inputs
    upcast = {k: None if v is None else (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    expected = pool(**upcast)
    torch.testing.assert_close(out["similarity"], expected["similarity"], rtol=1e-6, atol=1e-6)
    assert torch.equal(out["prompted_embedding"], expected["prompted_embedding"])
    out["reduce_sim"].backward()
    assert pool.prompt_key.grad.dtype == torch.float32


def test_low_precision_grad_reaches_input_in_its_dtype() -> None:
    case = PoolCase(dtype=torch.bfloat16)
    pool = make_pool(case, seed=0)
    x = make_inputs(case, seed=1)["x_embed"].requires_grad_(True)
    out = pool(x)
    (out["prompted_embedding"].sum() + out["reduce_sim"]).backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
