"""torch.compile of the module on every CPU backend: compiled as the very first call of a fresh process,
one graph for every batch size under ``dynamic=True``, and out-of-range ids clamped as the reference does.

The Triton backend runs through its interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
without a GPU) and is compiled with ``aot_eager``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

from l2p_fast import FusedPromptPool, dispatch
from l2p_fast.testing import clone_pool

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("reference", "cpu", "triton")
CONFIG = dict(length=2, embed_dim=8, prompt_pool=True, prompt_key=True, pool_size=5, top_k=2)


def require(backend: str) -> None:
    reason = dispatch.unavailable_reason(backend, "cpu", "pool_forward")
    if reason is not None:
        pytest.skip(f"backend={backend!r} cannot run on cpu: {reason}")


def compiler_of(backend: str) -> str:
    return "aot_eager" if backend == "triton" else "inductor"


def pools(backend: str, seed: int = 0, **overrides) -> tuple[FusedPromptPool, FusedPromptPool]:
    """The module on ``backend`` and a reference twin with the same parameters."""
    config = {**CONFIG, **overrides}
    torch.manual_seed(seed)
    module = FusedPromptPool(**config, backend=backend)
    return module, clone_pool(module, "reference")


def assert_same_outputs(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, msg=key)
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_as_the_first_call_of_a_fresh_process(backend: str) -> None:
    """Nothing runs eagerly before the compiled forward + backward (with a prompt_mask, then without)."""
    require(backend)
    code = textwrap.dedent(f"""
        import torch
        from l2p_fast import FusedPromptPool
        torch.manual_seed(0)
        pool = FusedPromptPool(**{CONFIG!r}, embedding_key="mean_max", backend={backend!r})
        forward = torch.compile(pool, fullgraph=True, backend={compiler_of(backend)!r})
        x = torch.randn(3, 4, 8, requires_grad=True)
        mask = torch.tensor([[0, 1], [2, 3], [4, 0]])
        out = forward(x, prompt_mask=mask)
        (out["prompted_embedding"].sum() + out["reduce_sim"]).backward()
        assert out["prompt_idx"].tolist() == mask.tolist()
        assert x.grad is not None and pool.prompt.grad is not None and pool.prompt_key.grad is not None
        out = forward(x)
        assert out["prompted_embedding"].shape == (3, 8, 8)
        print("compiled first: ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled first: ok" in result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_shapes_compile_one_graph_for_every_batch_size(backend: str) -> None:
    require(backend)
    torch._dynamo.reset()
    module, twin = pools(backend, seed=1, embedding_key="mean_max", batchwise_prompt=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler_of(backend))
    forward = torch.compile(module, fullgraph=True, dynamic=True, backend=counter)
    # one graph without a mask, one with: a third would be an error under fullgraph
    with torch._dynamo.config.patch(recompile_limit=2):
        for batch in range(2, 13):  # 11 sizes (0 and 1 are always specialised)
            x = torch.randn(batch, 4, 8)
            mask = torch.randint(0, CONFIG["pool_size"], (batch, 3))
            assert_same_outputs(forward(x), twin(x))
            assert_same_outputs(forward(x, prompt_mask=mask), twin(x, prompt_mask=mask))
    assert counter.frame_count == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 5, 1 << 40])
def test_out_of_range_mask_under_compile_is_clamped_like_the_reference(backend: str, bad: int) -> None:
    """Under torch.compile the value check is skipped: every backend clamps ids to [0, M − 1]."""
    require(backend)
    torch._dynamo.reset()
    module, twin = pools(backend, seed=2)
    x = torch.randn(3, 4, 8)
    mask = torch.tensor([[0, bad], [bad, 2], [3, 4]])
    clamped = mask.clamp(0, CONFIG["pool_size"] - 1)
    with pytest.raises(ValueError, match=r"prompt_mask: expected ids in \[0, pool_size=5\)"):
        module(x, prompt_mask=mask)  # eager: a clear error before any kernel
    out = torch.compile(module, fullgraph=True, backend=compiler_of(backend))(x, prompt_mask=mask)
    expected = twin(x, prompt_mask=clamped)
    assert_same_outputs(out, expected)
    grads = torch.autograd.grad(out["prompted_embedding"].square().sum() + out["reduce_sim"],
                                [module.prompt, module.prompt_key])  # fmt: skip
    expected_grads = torch.autograd.grad(expected["prompted_embedding"].square().sum() + expected["reduce_sim"],
                                         [twin.prompt, twin.prompt_key])  # fmt: skip
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_explicit_unavailable_backend_under_compile_raises_the_same_error() -> None:
    torch._dynamo.reset()
    module = FusedPromptPool(**CONFIG, backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available on 'cpu': backend 'cuda' runs on 'cuda'"):
        torch.compile(module, fullgraph=True, backend="aot_eager")(torch.randn(2, 3, 8))
