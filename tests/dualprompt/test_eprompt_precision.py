"""``FusedEPrompt`` in fp32 and with bf16 tokens against the fp64 truth (flash-attention's rule, as the L2P pool's
tests), and with NaN tokens as the reference: same ids, NaN at the same places."""

import pytest
import torch

from l2p_fast.dualprompt import FusedEPrompt
from l2p_fast.dualprompt.reference import eprompt_forward
from l2p_fast.testing import assert_close_to_truth, max_error

BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.requires_backend("cpu")),
    pytest.param("triton", marks=pytest.mark.requires_backend("triton")),
]
VALUES = ("similarity", "selected_key", "prompt_key_norm", "x_embed_norm")


def _module(backend: str, embedding_key: str) -> FusedEPrompt:
    torch.manual_seed(5)
    return FusedEPrompt(
        length=2, embed_dim=24, embedding_key=embedding_key, prompt_pool=True, prompt_key=True, pool_size=6, top_k=2,
        num_layers=2, use_prefix_tune_for_e_prompt=True, num_heads=4, backend=backend,
    )  # fmt: skip


def _reference(module: FusedEPrompt, x_embed: torch.Tensor, prompt: torch.Tensor, keys: torch.Tensor) -> dict:
    return eprompt_forward(x_embed, prompt, keys, embedding_key=module.embedding_key, top_k=2, batchwise=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_fp64_truth(backend: str, x_dtype: torch.dtype) -> None:
    module = _module(backend, "mean_max")
    x_embed = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    out = module(x_embed)
    low = _reference(module, x_embed, module.prompt, module.prompt_key)
    truth = _reference(module, x_embed.double(), module.prompt.double(), module.prompt_key.double())
    assert torch.equal(out["prompt_idx"], truth["prompt_idx"])
    assert torch.equal(out["batched_prompt"], low["batched_prompt"])  # copies of fp32 prompts
    for key in VALUES:
        assert_close_to_truth(key, out[key], low[key], truth[key])
    assert_close_to_truth("reduce_sim", out["reduce_sim"], low["reduce_sim"], truth["reduce_sim"], scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("embedding_key", ["mean", "max"])
def test_nan_tokens_as_the_reference(backend: str, embedding_key: str) -> None:
    module = _module(backend, embedding_key).double()
    x_embed = torch.randn(4, 5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_embed[1, 3, 7] = float("nan")
    out = module(x_embed)
    want = _reference(module, x_embed, module.prompt, module.prompt_key)
    assert torch.equal(out["prompt_idx"], want["prompt_idx"])
    assert torch.equal(out["batched_prompt"], want["batched_prompt"])
    for key in (*VALUES, "reduce_sim"):
        assert max_error(out[key], want[key]) <= 1e-12, key  # asserts NaN at the same places
