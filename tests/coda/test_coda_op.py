"""``coda_prompt`` on every CPU backend against the plain reference: random configs in fp64 (tight), fp32 / bf16
against the fp64 truth (``l2p_fast.testing``'s flash-attention rule), frozen / unused rows, opcheck, gradcheck,
torch.compile parity, determinism, NaN/inf as the reference, named errors."""

import pytest
import torch

from l2p_fast.coda import coda_prompt
from l2p_fast.ops.coda import native_coda_prompt
from l2p_fast.ops.coda_triton import coda_prompt_triton
from l2p_fast.testing import assert_close_to_truth

FUSED = [
    pytest.param("cpu", marks=pytest.mark.requires_backend("cpu")),
    pytest.param("triton", marks=pytest.mark.requires_backend("triton")),
]
TOL64 = {"rtol": 1e-10, "atol": 1e-12}
# B, Dk, M, Lp, D, start, stop: odd sizes, B = 1, one used row, every row, frozen rows, unused rows
CONFIGS = [(3, 7, 6, 4, 5, 2, 4), (1, 16, 10, 8, 12, 0, 10), (5, 33, 9, 3, 17, 0, 1), (4, 12, 8, 2, 9, 6, 8),
           (2, 130, 20, 6, 40, 5, 15)]


def _inputs(config, dtype=torch.float64, seed=0, device="cpu"):
    batch, key_dim, pool, length, width, _, _ = config
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, key_dim, generator=g, dtype=torch.float64)
    keys = torch.randn(pool, key_dim, generator=g, dtype=torch.float64)
    attn = torch.randn(pool, key_dim, generator=g, dtype=torch.float64)
    prompt = torch.randn(pool, length, width, generator=g, dtype=torch.float64)
    return [t.to(device, dtype).requires_grad_(True) for t in (q, keys, attn, prompt)]


def _run(backend, inputs, start, stop, seed=1):
    mixed, weights = coda_prompt(*inputs, start, stop, backend=backend)
    g = torch.Generator().manual_seed(seed)
    gm = torch.randn(mixed.shape, generator=g, dtype=torch.float64).to(mixed.device, mixed.dtype)
    gw = torch.randn(weights.shape, generator=g, dtype=torch.float64).to(weights.device, weights.dtype)
    grads = torch.autograd.grad((mixed * gm).sum() + (weights * gw).sum(), inputs)
    return (mixed, weights, *grads)


NAMES = ("mixed", "weights", "grad q", "grad keys", "grad attn", "grad prompt")


@pytest.mark.parametrize("config", CONFIGS)
def test_fp64_matches_reference(fused_backend_device: tuple, config: tuple) -> None:
    backend, device = fused_backend_device
    inputs = _inputs(config, device=device)
    got = _run(backend, inputs, *config[5:])
    want = _run("reference", inputs, *config[5:])
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **TOL64, msg=name)
    start, stop = config[5:]
    for grad in got[3:]:  # frozen and unused rows get exactly zero
        assert not grad[:start].any() and not grad[stop:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS[:3])
def test_low_precision_against_fp64_truth(fused_backend_device: tuple, dtype: torch.dtype, config: tuple) -> None:
    backend, device = fused_backend_device
    truth = _run("reference", _inputs(config, device=device), *config[5:])
    low = _run("reference", _inputs(config, dtype, device=device), *config[5:])
    got = _run(backend, _inputs(config, dtype, device=device), *config[5:])
    for name, a, lo, t in zip(NAMES, got, low, truth, strict=True):
        assert a.dtype == dtype, name
        # the mix and its gradients sum F (or B) terms: the floor is relative to the sum of their magnitudes
        scale = max(1.0, t.abs().max().item()) * (config[6] if name != "weights" else 1)
        assert_close_to_truth(name, a, lo, t, scale=scale)


@pytest.mark.parametrize("backend", FUSED)
def test_no_query_grad_and_unused_weights(backend: str) -> None:
    q, keys, attn, prompt = _inputs(CONFIGS[0])
    q = q.detach()
    mixed, _ = coda_prompt(q, keys, attn, prompt, 2, 4, backend=backend)
    grads = torch.autograd.grad(mixed.sum(), (keys, attn, prompt))
    want = torch.autograd.grad(coda_prompt(q, keys, attn, prompt, 2, 4, backend="reference")[0].sum(),
                               (keys, attn, prompt))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, **TOL64)


def test_deterministic(fused_backend_device: tuple) -> None:
    backend, device = fused_backend_device
    inputs = _inputs(CONFIGS[4], torch.float32, device=device)
    first = _run(backend, inputs, *CONFIGS[4][5:])
    second = _run(backend, inputs, *CONFIGS[4][5:])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck(backend: str) -> None:
    """Rows [0, stop) used, rows >= stop unused (zero gradient is exact); frozen rows (start > 0) are detached on
    purpose, which finite differences cannot see: they are held to the reference in the fp64 test."""
    inputs = _inputs((2, 5, 5, 2, 3, 0, 4))
    assert torch.autograd.gradcheck(lambda *t: coda_prompt(*t, 0, 4, backend=backend), inputs)


def test_opcheck() -> None:
    inputs = _inputs(CONFIGS[0], torch.float32)
    torch.library.opcheck(native_coda_prompt, (*inputs, 2, 4))
    torch.library.opcheck(native_coda_prompt, (*inputs, 0, 6))


@pytest.mark.requires_backend("triton")
def test_opcheck_triton() -> None:
    inputs = _inputs(CONFIGS[0], torch.float32)
    torch.library.opcheck(coda_prompt_triton, (*inputs, 2, 4))


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_compile_parity(backend: str) -> None:
    inputs = _inputs(CONFIGS[0], torch.float32)
    compiled = torch.compile(lambda *t: coda_prompt(*t, 2, 4, backend=backend), fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    want = coda_prompt(*inputs, 2, 4, backend=backend)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ga = torch.autograd.grad(got[0].sum() + got[1].sum(), inputs)
    gb = torch.autograd.grad(want[0].sum() + want[1].sum(), inputs)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_nan_inf_and_zero_rows_as_reference(backend: str) -> None:
    """A NaN / inf query row, a zero attention row (q ⊙ A = 0: weight 0), a zero key (weight 0) behave as the
    reference: NaN where it has NaN, the same finite values elsewhere."""
    q, keys, attn, prompt = (t.detach() for t in _inputs(CONFIGS[1]))
    q[0, 3] = float("nan")
    q[-1, 0] = float("inf") if q.shape[0] > 1 else q[-1, 0]
    attn[2] = 0.0
    keys[4] = 0.0
    q2 = torch.cat([q, torch.randn(2, q.shape[1], dtype=q.dtype)])
    q2[-2, 1] = float("inf")
    inputs = [t.requires_grad_(True) for t in (q2, keys, attn, prompt)]
    got = _run(backend, inputs, 0, 10)
    want = _run("reference", inputs, 0, 10)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert torch.equal(a.isnan(), b.isnan()), name
        torch.testing.assert_close(a, b, **TOL64, equal_nan=True, msg=name)
    assert not got[1][1:-2, 2].any() and not got[1][1:-2, 4].any()  # the zero rows' weights (finite rows)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(0, a[0][:, :3]), r"q: expected \(B >= 1, Dk = 7\)"),
        (lambda a: a.__setitem__(2, a[2][:4]), "attn: expected keys' shape"),
        (lambda a: a.__setitem__(3, a[3][:, :, 0]), "prompt: expected a 3-D float tensor"),
        (lambda a: a.__setitem__(3, a[3][:5]), r"prompt: expected \(M = 6"),
        (lambda a: a.__setitem__(4, 4), "start, stop: expected 0 <= start < stop <= M = 6, got start=4, stop=4"),
        (lambda a: a.__setitem__(5, 7), "start, stop: expected 0 <= start < stop <= M = 6"),
        (lambda a: a.__setitem__(1, a[1].long()), "keys: expected a 2-D float tensor"),
    ],
)
def test_named_errors(change, match: str) -> None:
    args = [t.detach() for t in _inputs(CONFIGS[0])] + [2, 4]
    change(args)
    with pytest.raises(ValueError, match=match):
        coda_prompt(*args, backend="reference")


def test_dtype_mismatch_and_bad_backend() -> None:
    q, keys, attn, prompt = (t.detach() for t in _inputs(CONFIGS[0]))
    with pytest.raises(TypeError, match="prompt: expected keys' dtype torch.float64, got torch.float32"):
        coda_prompt(q, keys, attn, prompt.float(), 0, 6)
    with pytest.raises(TypeError, match="start: expected an int, got float"):
        coda_prompt(q, keys, attn, prompt, 0.0, 6)
    with pytest.raises(RuntimeError, match="backend='nope'"):
        coda_prompt(q, keys, attn, prompt, backend="nope")
    mixed, weights = coda_prompt(q.float(), keys, attn, prompt)  # q is cast to the parameters' dtype
    assert mixed.dtype == weights.dtype == torch.float64 and weights.shape == (3, 6)


@pytest.mark.requires_backend("triton")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_gpu_block_sizes_in_the_interpreter(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block sizes the launchers pick on a GPU, under the interpreter: several masked tiles in every loop
    (Dk = 300 over 128-wide tiles, F = 37 over 16-row blocks, Lp·D = 1400 over 1024 / 256-wide tiles)."""
    from l2p_fast.ops import triton_launch

    monkeypatch.setattr(triton_launch, "GPU_BLOCKS_IN_INTERPRETER", True)
    config = (3, 300, 40, 2, 700, 11, 37)
    got = _run("triton", _inputs(config, dtype), *config[5:])
    want = _run("reference", _inputs(config, dtype), *config[5:])
    tol = TOL64 if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=name)
