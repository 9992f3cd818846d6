"""``FusedCodaPrompt`` beyond the golden cases: constructor checks, Gram–Schmidt structure, task switching, the
original's call on a non-prompt layer, state-dict names, and torch.compile of a layer's mix."""

import pytest
import torch

from l2p_fast import FusedCodaPrompt
from l2p_fast.coda import reference as ref


def _module(**options) -> FusedCodaPrompt:
    args = {"emb_d": 12, "n_tasks": 3, "prompt_param": [6, 4, 0.0], "key_dim": 10, **options}
    return FusedCodaPrompt(args.pop("emb_d"), args.pop("n_tasks"), args.pop("prompt_param"), **args,
                           generator=torch.Generator().manual_seed(0))


def test_parameter_names_and_initial_rows() -> None:
    module = _module()
    assert sorted(n for n, _ in module.named_parameters()) == sorted(
        f"e_{k}_{i}" for k in "pka" for i in range(5))
    for param in module.parameters():
        rows = param.detach().reshape(6, -1).double()
        torch.testing.assert_close(rows[:2] @ rows[:2].T, torch.eye(2, dtype=rows.dtype), atol=1e-6, rtol=0)
        assert not rows[2:].any()  # rows of later tasks are zero until their task starts


def test_process_task_count_keeps_old_rows_and_orthogonalises_new_ones() -> None:
    module = _module()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    module.process_task_count(torch.Generator().manual_seed(1))
    assert module.task_count == 1 and module.task_rows() == (2, 4)
    for name, param in module.named_parameters():
        rows = param.detach().reshape(6, -1).double()
        torch.testing.assert_close(param[:2], before[name][:2])
        torch.testing.assert_close(rows[:4] @ rows[:4].T, torch.eye(4, dtype=rows.dtype), atol=1e-6, rtol=0)
        assert not rows[4:].any()
    module.set_task(2)
    with pytest.raises(ValueError, match="task_count: already at the last task 2 of n_tasks = 3"):
        module.process_task_count()
    with pytest.raises(ValueError, match="task: expected 2 <= task < n_tasks = 3, got 1"):
        module.set_task(1)


def test_used_rows_follow_train_flag() -> None:
    module = _module()
    module.set_task(1)
    assert module.used_rows(True) == (2, 4) and module.used_rows(False) == (0, 4)
    q = torch.randn(3, 10)
    _, weights, loss = module.mix(q, 0, train=True)
    assert weights.shape == (3, 4) and loss.shape == () and not loss


def test_non_prompt_layer_and_loss_tensor() -> None:
    module = _module(layers=(1, 3))
    q, block = torch.randn(2, 10), torch.randn(2, 5, 12)
    p_return, loss, out = module(q, 0, block, train=True)
    assert p_return is None and isinstance(loss, torch.Tensor) and not loss and out is block
    (ek, ev), loss, _ = module(q, 3, block, train=True)
    assert ek.shape == ev.shape == (2, 2, 12)
    with pytest.raises(ValueError, match=r"layer: expected one of the prompted layers \[1, 3\], got 0"):
        module.mix(q, 0)


def test_ortho_loss_matches_reference_on_used_rows() -> None:
    module = _module(prompt_param=[6, 4, 0.5])
    module.set_task(1)
    keys, attn, prompt = module.layer_params(2)
    _, _, loss = module.mix(torch.randn(2, 10), 2, train=True)
    want = ref.ortho_loss(keys[:4], attn[:4], prompt[:4], 0.5)
    torch.testing.assert_close(loss, want)
    assert not module.mix(torch.randn(2, 10), 2, train=False)[2]


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"prompt_param": [6, 4]}, ValueError, r"prompt_param: expected \[pool_size, length, ortho_mu\]"),
        ({"prompt_param": [2, 4, 0.0]}, ValueError, r"prompt_param\[0\] \(pool_size\): expected at least n_tasks"),
        ({"prompt_param": [6, 0, 0.0]}, ValueError, r"prompt_param\[1\] \(length\): expected a positive"),
        ({"prompt_param": [6, 4, -1.0]}, ValueError, r"prompt_param\[2\] \(ortho_mu\): expected a finite number"),
        ({"emb_d": 0}, ValueError, "emb_d: expected a positive int, got 0"),
        ({"layers": (0, 0)}, ValueError, "layers: expected distinct non-negative layer indices"),
        ({"key_dim": 5}, ValueError, r"prompt_param\[0\] \(pool_size\): 6 orthonormal rows need key_dim and "
                                     r"Lp·emb_d >= 6, got key_dim=5, Lp·emb_d=48"),
    ],
)
def test_constructor_errors(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _module(**options)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.requires_backend("cpu"))])
def test_compiled_mix_matches_eager(backend: str) -> None:
    module = _module(backend=backend)
    module.set_task(1)
    q = torch.randn(3, 10)
    compiled = torch.compile(lambda q: module.mix(q, 2, True), fullgraph=True, backend="aot_eager")
    got, want = compiled(q), module.mix(q, 2, True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(got[0].sum(), module.layer_params(2))
    gb = torch.autograd.grad(want[0].sum(), module.layer_params(2))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)
