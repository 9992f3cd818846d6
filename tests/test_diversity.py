"""Diversified selection (docs/behaviour.md §8, the L2P paper's equation 4) on hand-made frequency vectors.

Selection orders prompts by the penalised score −max(1 − s, 0)·h first (the cosine distance weighted by
the prompt's selection frequency h in earlier tasks), then by similarity, then by id; the similarity
outputs and the pull term are the unpenalised ones. Every backend is held to the reference.
"""

from __future__ import annotations

import pytest
import torch

from l2p_fast import FusedPromptPool, dispatch, reference

D, M, K = 4, 5, 2


def unit_keys() -> torch.Tensor:
    """Keys (M, D): e0, e1, e2, e3 and a copy of e0 as id 4 (exact ties with id 0)."""
    keys = torch.zeros(M, D)
    keys[:4] = torch.eye(4)
    keys[4, 0] = 1.0
    return keys


def run(backend: str, x: torch.Tensor, keys: torch.Tensor, *, top_k: int = K, batchwise: bool = False,
        frequency: torch.Tensor | None = None, cls: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None, prompt: torch.Tensor | None = None, device: str = "cpu") -> dict:
    """The backend's pool op on ``device`` (inputs moved there); outputs back on the CPU."""
    fn = dispatch.implementation("pool_forward", backend, device)
    prompt = prompt if prompt is not None else torch.arange(keys.shape[0] * 2 * D, dtype=keys.dtype).reshape(
        keys.shape[0], 2, D)
    to = (lambda t: None if t is None else t.to(device)) if device != "cpu" else (lambda t: t)
    out = fn(to(x), to(prompt), to(keys), embedding_key="cls" if cls is not None else "mean", top_k=top_k,
             batchwise=batchwise, cls_features=to(cls), prompt_mask=to(prompt_mask), frequency=to(frequency))
    return {key: value.cpu() if device != "cpu" else value for key, value in out.items()}


def test_penalised_score_by_hand() -> None:
    sim = torch.tensor([[0.5, 1.0, 1.25, -1.0, float("nan")]])
    freq = torch.tensor([0.5, 0.25, 1.0, 0.0, 0.5])
    got = reference.penalised_score(sim, freq)
    assert got[0, :4].tolist() == [-0.25, -0.0, -0.0, -0.0]  # a distance below 0 (s > 1) counts as 0
    assert torch.isnan(got[0, 4])


def test_used_prompt_loses_to_an_unused_one_at_equal_similarity(fused_backend_device) -> None:
    backend, device = fused_backend_device
    cls = torch.tensor([[1.0, 0.5, 0.0, 0.0]])  # similarity: ids 0 and 4 tie (0.894), id 1 next (0.447)
    x = torch.randn(1, 3, D)
    for name in ("reference", backend):
        on = {"device": device}
        assert run(name, x, unit_keys(), cls=cls, **on)["prompt_idx"].tolist() == [[0, 4]]  # tie: lower id first
        used = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0])
        assert run(name, x, unit_keys(), cls=cls, frequency=used, **on)["prompt_idx"].tolist() == [[4, 1]]
        both = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.25])  # both used: the less used one first, unused id 1 ahead
        assert run(name, x, unit_keys(), cls=cls, frequency=both, **on)["prompt_idx"].tolist() == [[1, 2]]


def test_zero_frequency_is_todays_selection(backend_device) -> None:
    backend, device = backend_device
    gen = torch.Generator().manual_seed(0)
    x, keys = torch.randn(7, 3, D, generator=gen), torch.randn(M, D, generator=gen)
    for batchwise in (False, True):
        plain = run(backend, x, keys, batchwise=batchwise, device=device)
        zero = run(backend, x, keys, batchwise=batchwise, frequency=torch.zeros(M), device=device)
        for key in plain:
            assert torch.equal(plain[key], zero[key]), key


def test_outputs_other_than_the_ids_are_unpenalised(backend_device) -> None:
    backend, device = backend_device
    gen = torch.Generator().manual_seed(1)
    x, keys = torch.randn(6, 3, D, generator=gen), torch.randn(M, D, generator=gen)
    freq = torch.tensor([0.4, 0.0, 0.3, 0.3, 0.0])
    div = run(backend, x, keys, frequency=freq, device=device)
    masked = run(backend, x, keys, prompt_mask=div["prompt_idx"], device=device)  # the same ids, given: no penalty anywhere
    for key in div:
        assert torch.equal(div[key], masked[key]), key


@pytest.mark.parametrize("batchwise", [False, True])
def test_every_backend_equals_the_reference(backend_device, batchwise: bool) -> None:
    backend, device = backend_device
    gen = torch.Generator().manual_seed(2)
    m = 9
    x, keys = torch.randn(8, 5, D, generator=gen), torch.randn(m, D, generator=gen)
    x[3, 1, 2] = float("nan")  # a NaN query row: NaN similarities rank first, by id
    prompt = torch.randn(m, 2, D, generator=gen)
    for freq in (torch.rand(m, generator=gen), torch.tensor([0.0, 0.2, 0.0, 0.1, 0.0, 0.3, 0.0, 0.0, 0.4])):
        want = run("reference", x, keys, top_k=3, batchwise=batchwise, frequency=freq, prompt=prompt)
        got = run(backend, x, keys, top_k=3, batchwise=batchwise, frequency=freq, prompt=prompt, device=device)
        assert torch.equal(got["prompt_idx"], want["prompt_idx"])
        assert torch.allclose(got["similarity"], want["similarity"], equal_nan=True, atol=1e-6)
        counts = dispatch.implementation("pool_vote_counts", backend, device)(
            x.to(device), keys.to(device), embedding_key="mean", top_k=3, frequency=freq.to(device))
        want_counts = reference.pool_vote_counts(x, keys, embedding_key="mean", top_k=3, frequency=freq)
        assert torch.equal(counts.cpu(), want_counts)
    assert want["prompt_idx"][3].tolist() == (want["prompt_idx"][0].tolist() if batchwise else [0, 1, 2])


def test_mask_takes_priority_over_the_frequency(backend_device) -> None:
    backend, device = backend_device
    x, mask = torch.randn(2, 3, D), torch.tensor([[3, 1], [0, 0]])
    out = run(backend, x, unit_keys(), frequency=torch.ones(M), prompt_mask=mask, device=device)
    assert torch.equal(out["prompt_idx"], mask)


def test_gradients_with_a_frequency(backend_device) -> None:
    """The penalty has no gradient: every backend's gradients equal the reference's; gradcheck in fp64."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    x, keys = torch.randn(4, 3, D, generator=gen, dtype=torch.float64), torch.randn(M, D, generator=gen,
                                                                                    dtype=torch.float64)
    prompt = torch.randn(M, 2, D, generator=gen, dtype=torch.float64)
    freq = torch.tensor([0.5, 0.0, 0.25, 0.0, 0.25])

    def loss_and_grads(name: str, on: str) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (x, prompt, keys)]
        out = run(name, leaves[0], leaves[2], frequency=freq, prompt=leaves[1], device=on)
        loss = (out["prompted_embedding"] ** 2).sum() + out["reduce_sim"] + out["similarity"].sum()
        return list(torch.autograd.grad(loss, leaves))

    for got, want in zip(loss_and_grads(backend, device), loss_and_grads("reference", "cpu"), strict=True):
        assert torch.allclose(got, want, atol=1e-10)
    if backend == "reference":
        def fn(x_, p_, k_):
            out = run("reference", x_, k_, frequency=freq, prompt=p_)
            return out["prompted_embedding"], out["reduce_sim"]
        assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_(True) for t in (x, prompt, keys)])


def test_module_applies_the_frequency_in_training_only() -> None:
    pool = FusedPromptPool(length=2, embed_dim=D, embedding_key="cls", prompt_pool=True, prompt_key=True,
                           pool_size=M, top_k=1, backend="reference")
    with torch.no_grad():
        pool.prompt_key.copy_(unit_keys())
    cls, x = torch.tensor([[1.0, 0.5, 0.0, 0.0]]), torch.randn(1, 3, D)
    pool.set_prompt_frequency(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    assert pool(x, cls_features=cls)["prompt_idx"].tolist() == [[4]]  # training mode: id 0 was used
    pool.eval()
    assert pool(x, cls_features=cls)["prompt_idx"].tolist() == [[0]]  # evaluation: equation 3, no penalty
    pool.train()
    pool.set_prompt_frequency(None)
    assert pool(x, cls_features=cls)["prompt_idx"].tolist() == [[0]]
    assert "prompt_frequency" not in pool.state_dict()  # the port's state-dict names only


def test_frequency_is_checked() -> None:
    pool = FusedPromptPool(length=2, embed_dim=D, prompt_pool=True, pool_size=M, top_k=1)
    with pytest.raises(ValueError, match=r"frequency: expected shape \(M,\) = \(5,\), got \(4,\)"):
        pool.set_prompt_frequency(torch.zeros(4))
    with pytest.raises(TypeError, match="frequency: expected a floating-point tensor"):
        pool.set_prompt_frequency(torch.zeros(M, dtype=torch.int64))
    with pytest.raises(ValueError, match="prompt_frequency: expected finite values >= 0"):
        pool.set_prompt_frequency(torch.tensor([0.0, -1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="prompt_frequency: expected finite values >= 0"):
        pool.set_prompt_frequency(torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="prompt_frequency: expected None in non-pool mode"):
        FusedPromptPool(length=2, embed_dim=D).set_prompt_frequency(torch.zeros(M))


def _op_args(device: str, requires_grad: bool) -> tuple:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, D, generator=gen).to(device).requires_grad_(requires_grad)
    prompt = torch.randn(M, 2, D, generator=gen).to(device).requires_grad_(requires_grad)
    keys = torch.randn(M, D, generator=gen).to(device).requires_grad_(requires_grad)
    freq = torch.tensor([0.4, 0.0, 0.3, 0.3, 0.0], device=device)
    counts = torch.tensor([1, 4, 0, 4, 2], device=device)
    return x, prompt, keys, freq, counts


def test_opcheck_with_frequency_and_counts(fused_backend_device) -> None:
    """opcheck (schema, fake, autograd registration, AOT dispatch) of the pool op with frequency and given vote
    counts, and of the count op, on the backend's own ops."""
    backend, device = fused_backend_device
    x, prompt, keys, freq, counts = _op_args(device, requires_grad=True)
    ops = torch.ops.l2p_fast
    for mode_args in ((0, K, False, freq, None), (2, K, True, freq, None), (0, K, True, None, counts)):
        if backend == "triton":
            torch.library.opcheck(ops.triton_pool_forward.default, (x, prompt, keys, None, None, *mode_args))
        else:
            torch.library.opcheck(ops.pool_forward.default, (x, None, prompt, keys, None, *mode_args))
    x, _, keys, freq, _ = _op_args(device, requires_grad=False)
    for frequency in (None, freq):
        if backend == "triton":
            torch.library.opcheck(ops.triton_pool_vote_counts.default, (x, keys, None, frequency, 1, K))
        else:
            torch.library.opcheck(ops.pool_vote_counts.default, (x, None, keys, frequency, 1, K))


def test_compiled_module_with_frequency(backend_device) -> None:
    backend, device = backend_device
    pool = FusedPromptPool(length=2, embed_dim=D, prompt_pool=True, prompt_key=True, pool_size=M, top_k=K,
                           batchwise_prompt=False, backend=backend).to(device)
    x = torch.randn(6, 3, D, generator=torch.Generator().manual_seed(5)).to(device)
    pool.set_prompt_frequency(torch.tensor([0.4, 0.0, 0.3, 0.3, 0.0], device=device))
    eager = pool(x)["prompt_idx"]
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")(x)["prompt_idx"]
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager, pool.eval()(x)["prompt_idx"])  # the frequency changed the training selection
