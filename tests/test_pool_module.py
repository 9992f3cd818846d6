"""FusedPromptPool as a module: outputs of docs/behaviour.md §4.5, construction, parameters, state dicts."""

import pytest
import torch

from l2p_fast import FusedPromptPool
from l2p_fast.ops import pool_outputs
from l2p_fast.testing import PoolCase, make_inputs, make_pool

EXPECTED_KEYS = [
    "prompt_idx", "prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim",
    "total_prompt_len", "prompted_embedding",
]


@pytest.mark.parametrize("embedding_key", ["mean", "max", "mean_max", "cls"])
def test_pool_outputs_keys_shapes_dtypes(backend_device: tuple[str, str], embedding_key: str) -> None:
    """The output contract (docs/behaviour.md §4.5) on every backend and device (values: test_backend_parity)."""
    backend, device = backend_device
    case = PoolCase(batch=3, tokens=7, width=12, pool_size=5, top_k=2, length=3, embedding_key=embedding_key,
                    use_cls=embedding_key == "cls")
    pool = make_pool(case, backend=backend, device=device)
    out = pool(**make_inputs(case, device=device))
    assert list(out) == EXPECTED_KEYS
    shapes = {
        "prompt_idx": (3, 2), "prompt_norm": (5, 12), "x_embed_norm": (3, 12), "similarity": (3, 5),
        "selected_key": (3, 2, 12), "reduce_sim": (), "prompted_embedding": (3, 2 * 3 + 7, 12),
    }
    for key, shape in shapes.items():
        assert tuple(out[key].shape) == shape, key
    assert out["prompt_idx"].dtype == torch.int64
    assert all(out[k].dtype == torch.float32 for k in shapes if k != "prompt_idx")
    assert all(out[k].device.type == device for k in shapes)
    assert out["total_prompt_len"] == 6 and isinstance(out["total_prompt_len"], int)


def test_non_pool_mode_and_default_constructor() -> None:
    pool = FusedPromptPool()  # the port crashes here (docs/behaviour.md §6)
    assert pool.prompt.shape == (5, 768) and pool.prompt.requires_grad
    assert pool.prompt_key is None
    x = torch.randn(2, 4, 768)
    out = pool(x)
    assert list(out) == ["total_prompt_len", "prompted_embedding"]
    assert out["total_prompt_len"] == 5
    assert torch.equal(out["prompted_embedding"][1, :5], pool.prompt.detach())
    out["prompted_embedding"].sum().backward()
    assert torch.equal(pool.prompt.grad, torch.full((5, 768), 2.0))  # learnable, one prompt per sample


def test_attributes_and_parameter_names() -> None:
    pool = FusedPromptPool(length=4, embed_dim=8, embedding_key="cls", prompt_pool=True, prompt_key=True,
                           pool_size=6, top_k=3, batchwise_prompt=True)
    for name, value in dict(length=4, embed_dim=8, prompt_pool=True, embedding_key="cls", prompt_init="uniform",
                            pool_size=6, top_k=3, batchwise_prompt=True).items():
        assert getattr(pool, name) == value
    assert sorted(pool.state_dict()) == ["prompt", "prompt_key"]
    assert pool.prompt.shape == (6, 4, 8) and pool.prompt_key.shape == (6, 8)
    assert pool.prompt.dtype == torch.float32


def test_inits() -> None:
    torch.manual_seed(0)
    pool = FusedPromptPool(prompt_pool=True, prompt_key=True, pool_size=10, top_k=5, embed_dim=64)
    for p in (pool.prompt, pool.prompt_key):
        assert p.min() >= -1 and p.max() <= 1 and p.std() > 0.4  # U(-1, 1)
    zero = FusedPromptPool(prompt_pool=True, prompt_key=True, pool_size=2, top_k=1, embed_dim=4,
                           prompt_init="zero", prompt_key_init="zero")
    assert not zero.prompt.any() and not zero.prompt_key.any()


def test_seeded_init_is_reproducible() -> None:
    torch.manual_seed(3)
    a = FusedPromptPool(prompt_pool=True, prompt_key=True, pool_size=4, top_k=2, embed_dim=8)
    torch.manual_seed(3)
    b = FusedPromptPool(prompt_pool=True, prompt_key=True, pool_size=4, top_k=2, embed_dim=8)
    assert torch.equal(a.prompt, b.prompt) and torch.equal(a.prompt_key, b.prompt_key)


def test_keys_without_prompt_key_follow_current_prompts() -> None:
    case = PoolCase(learnable_key=False, pool_size=4, top_k=2)
    pool = make_pool(case)
    assert "prompt_key" not in pool.state_dict()
    torch.testing.assert_close(pool.keys(), pool.prompt.mean(dim=1))
    out = pool(**make_inputs(case))
    out["reduce_sim"].backward()
    assert pool.prompt.grad is not None and pool.prompt.grad.abs().sum() > 0  # keys train through prompts
    with torch.no_grad():
        pool.prompt.add_(1.0)
    torch.testing.assert_close(pool.keys(), pool.prompt.mean(dim=1))
    assert pool.double().keys().dtype == torch.float64  # moves with .to()


def test_state_dict_round_trip_and_upstream_checkpoint() -> None:
    case = PoolCase(pool_size=5, top_k=2)
    pool = make_pool(case, seed=1)
    inputs = make_inputs(case, seed=2)
    twin = FusedPromptPool(**case.module_kwargs(), backend="reference")
    twin.load_state_dict(pool.state_dict())
    a, b = pool(**inputs), twin(**inputs)
    for key in EXPECTED_KEYS:
        if key == "total_prompt_len":
            assert a[key] == b[key]
        else:
            assert torch.equal(a[key], b[key]), key
    # a checkpoint of the upstream module is {'prompt': (M, Lp, D), 'prompt_key': (M, D)}, also nested
    upstream = {"prompt.prompt": torch.randn(5, 2, 16), "prompt.prompt_key": torch.randn(5, 16)}
    holder = torch.nn.Module()
    holder.prompt = FusedPromptPool(**case.module_kwargs())
    holder.load_state_dict(upstream)
    assert torch.equal(holder.prompt.prompt, upstream["prompt.prompt"])


def test_extra_repr_mentions_backend() -> None:
    assert "backend='reference'" in repr(FusedPromptPool(backend="reference"))


def test_pool_outputs_names_each_tensor_in_the_module_order() -> None:
    tensors = [torch.full((1,), float(i)) for i in range(7)]
    named = pool_outputs(*tensors)
    assert list(named) == [key for key in EXPECTED_KEYS if key != "total_prompt_len"]
    assert [int(t) for t in named.values()] == list(range(7))  # positional order = the order of docs/behaviour.md §4.5
