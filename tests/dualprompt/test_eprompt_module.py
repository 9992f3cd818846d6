"""``FusedEPrompt`` on random configurations against the reference written from the paper's equations, on
every CPU backend; its constructor's checks, parameters, non-pool mode, compile parity and determinism."""

import pytest
import torch

from l2p_fast.dualprompt import FusedEPrompt
from l2p_fast.dualprompt.reference import eprompt_forward, gather_prompts

BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.requires_backend("cpu")),
    pytest.param("triton", marks=pytest.mark.requires_backend("triton")),
]
VALUES = ("similarity", "selected_key", "prompt_key_norm", "x_embed_norm", "reduce_sim")
CONFIGS = [  # (embedding_key, prefix, batchwise, top_k, mask, cls)
    ("cls", True, True, 1, False, True),
    ("mean", True, False, 2, False, False),
    ("max", False, True, 2, False, False),
    ("mean_max", True, False, 3, True, False),
    ("cls", False, False, 1, False, False),
]


def _module(embedding_key, prefix, batchwise, top_k, backend, layout="permute", seed=0, **extra):
    torch.manual_seed(seed)
    return FusedEPrompt(
        length=3, embed_dim=12, embedding_key=embedding_key, prompt_pool=True, prompt_key=True, pool_size=7,
        top_k=top_k, batchwise_prompt=batchwise, num_layers=2, use_prefix_tune_for_e_prompt=prefix, num_heads=3,
        layout=layout, backend=backend, **extra,
    ).double()  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{'prefix' if c[1] else 'tuning'}-k{c[3]}")
@pytest.mark.parametrize("layout", ["permute", "port"])
def test_random_against_reference(backend: str, config: tuple, layout: str) -> None:
    embedding_key, prefix, batchwise, top_k, masked, with_cls = config
    module = _module(embedding_key, prefix, batchwise, top_k, backend, layout)
    g = torch.Generator().manual_seed(CONFIGS.index(config))
    batch = 4
    x_embed = torch.randn(batch, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    cls_features = torch.randn(batch, 12, generator=g, dtype=torch.float64, requires_grad=True) if with_cls else None
    mask = torch.randint(0, 7, (batch, top_k), generator=g) if masked else None
    out = module(x_embed, prompt_mask=mask, cls_features=cls_features)
    want = eprompt_forward(
        x_embed, module.prompt, module.prompt_key, embedding_key=embedding_key, top_k=top_k, batchwise=batchwise,
        cls_features=cls_features, prompt_mask=mask, layout=layout,
    )  # fmt: skip
    assert list(out) == list(want)
    assert torch.equal(out["prompt_idx"], want["prompt_idx"])
    assert torch.equal(out["batched_prompt"], want["batched_prompt"])
    for key in VALUES:
        torch.testing.assert_close(out[key], want[key], rtol=1e-10, atol=1e-12, msg=key)
    inputs = [t for t in (x_embed, cls_features, module.prompt, module.prompt_key) if t is not None]
    weight = torch.randn(out["batched_prompt"].shape, generator=g, dtype=torch.float64)
    sim_weight = torch.randn(out["similarity"].shape, generator=g, dtype=torch.float64)

    def loss(o):
        return (o["batched_prompt"] * weight).sum() + o["reduce_sim"] + (o["similarity"] * sim_weight).sum()

    got = torch.autograd.grad(loss(out), inputs, allow_unused=True)
    expected = torch.autograd.grad(loss(want), inputs, allow_unused=True)
    for a, b in zip(got, expected, strict=True):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_port_layout_mixes_samples_and_halves() -> None:
    """The README's example: B=3, every row uses id 3, half h of prompt m holds 10·m + h."""
    prompt = (torch.arange(5).view(1, 1, 5, 1, 1, 1) * 10 + torch.arange(2).view(1, 2, 1, 1, 1, 1)).double()
    idx = torch.full((3, 1), 3)
    port = gather_prompts(prompt, idx, "port")[0, :, :, 0, 0, 0]
    assert port.tolist() == [[30, 30], [30, 31], [31, 31]]
    assert gather_prompts(prompt, idx, "permute")[0, :, :, 0, 0, 0].tolist() == [[30, 31]] * 3


def test_parameters_and_state_dict_are_the_ports() -> None:
    prefix = _module("cls", True, True, 1, "reference")
    assert dict(prefix.state_dict().items()).keys() == {"prompt", "prompt_key"}
    assert prefix.prompt.shape == (2, 2, 7, 3, 3, 4) and prefix.prompt_key.shape == (7, 12)
    tuning = _module("cls", False, True, 1, "reference")
    assert tuning.prompt.shape == (2, 7, 3, 12)
    assert tuning.pool_size == 7 and tuning.top_k == 1 and tuning.num_layers == 2


def test_constructor_errors_named() -> None:
    with pytest.raises(ValueError, match="same_key_value"):
        FusedEPrompt(prompt_pool=True, prompt_key=True, pool_size=4, top_k=1, same_key_value=True)
    with pytest.raises(ValueError, match="num_heads"):
        FusedEPrompt(embed_dim=12, use_prefix_tune_for_e_prompt=True, num_heads=5)
    with pytest.raises(ValueError, match="num_heads"):
        FusedEPrompt(embed_dim=12, use_prefix_tune_for_e_prompt=True)  # the port's default -1
    with pytest.raises(ValueError, match="layout"):
        FusedEPrompt(layout="upstream")
    with pytest.raises(ValueError, match="prompt_key"):
        FusedEPrompt(embed_dim=12, prompt_pool=True, pool_size=4, top_k=1, use_prefix_tune_for_e_prompt=True, num_heads=3)
    with pytest.raises(ValueError, match="num_layers"):
        FusedEPrompt(num_layers=0)
    with pytest.raises(ValueError, match="embedding_key"):
        FusedEPrompt(embedding_key="first")


def test_forward_errors_named() -> None:
    module = _module("mean", True, False, 1, "reference")
    with pytest.raises(ValueError, match="x_embed"):
        module(torch.randn(2, 3, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match="prompt_mask"):
        module(torch.randn(2, 3, 12, dtype=torch.float64), prompt_mask=torch.full((2, 1), 7))


def test_non_pool_mode_learns_one_prompt_per_layer() -> None:
    module = FusedEPrompt(length=2, embed_dim=8, num_layers=3, use_prefix_tune_for_e_prompt=True, num_heads=2)
    assert module.prompt.shape == (3, 2, 2, 2, 4) and module.prompt.requires_grad
    out = module(torch.randn(5, 4, 8))["batched_prompt"]
    assert out.shape == (3, 5, 2, 2, 2, 4) and torch.equal(out[:, 4], module.prompt)
    out.sum().backward()
    assert torch.equal(module.prompt.grad, torch.full_like(module.prompt, 5.0))
    tuning = FusedEPrompt(length=2, embed_dim=8, num_layers=3)
    assert tuning(torch.randn(5, 4, 8))["batched_prompt"].shape == (3, 5, 2, 8)


def test_keys_from_prompts_are_differentiable() -> None:
    module = FusedEPrompt(length=2, embed_dim=8, prompt_pool=True, pool_size=4, top_k=1, num_layers=2)
    assert module.prompt_key is None
    torch.testing.assert_close(module.keys(), module.prompt.mean(dim=(0, 2)))
    module(torch.randn(3, 5, 8))["reduce_sim"].backward()
    assert module.prompt.grad is not None and module.prompt.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_parity_and_determinism(backend: str) -> None:
    module = _module("mean", True, True, 2, backend).float()
    x_embed = torch.randn(3, 6, 12)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    runs = []
    for forward in (module, compiled, module):
        module.zero_grad()
        out = forward(x_embed)
        (out["batched_prompt"].square().sum() + out["reduce_sim"]).backward()
        runs.append((out["prompt_idx"], out["batched_prompt"].detach(), module.prompt.grad.clone(), module.prompt_key.grad.clone()))
    for a, b in zip(runs[0], runs[2], strict=True):
        assert torch.equal(a, b)  # eager twice: bit-identical
    for a, b in zip(runs[0], runs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
