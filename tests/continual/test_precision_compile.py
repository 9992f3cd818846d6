"""The trainer's ``precision`` (autocast, fp16 loss scaling in checkpoints) and ``compile`` options."""

from __future__ import annotations

import json

import pytest
import torch

from l2p_fast.continual.checkpoint import CHECKPOINT_NAME, CheckpointError, decode_checkpoint, restore_scaler
from l2p_fast.continual.config import PRECISIONS, RunConfig, validate_config
from l2p_fast.continual.trainer import Trainer, train
from l2p_fast.models import precision as precision_module
from l2p_fast.testing import Interrupted, interrupt_after


def test_cli_flags_reach_the_config():
    from l2p_fast.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--method", "l2p", "--output", "x", "--precision", "bf16", "--compile"])
    config = config_from_args(args, "l2p")
    assert config.precision == "bf16" and config.compile is True
    plain = config_from_args(build_parser().parse_args(["compare", "--output", "x"]), "l2p")
    assert plain.precision == "auto" and plain.compile is False


def test_config_precisions_are_the_models():
    assert PRECISIONS == precision_module.PRECISIONS


@pytest.mark.parametrize("field,value,match", [("precision", "fp8", "precision: expected one of"),
                                               ("compile", 1, "compile: expected a bool")])
def test_bad_options_name_the_argument(field, value, match):
    with pytest.raises(ValueError, match=match):
        validate_config(RunConfig(**{field: value}))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run_keeps_fp32_state(precision, tiny_backbone, tmp_path, tiny_config):
    trainer = Trainer(tiny_config("l2p", tiny_backbone.name, precision=precision), tmp_path, backbone=tiny_backbone)
    results = trainer.run()
    assert results["precision"] == precision and results["precision_requested"] == precision
    assert results["config"]["precision"] == precision and results["compile"] is False
    assert all(0.0 <= a <= 100.0 for row in results["accuracy_matrix"] for a in row)
    assert all(p.dtype == torch.float32 for p in trainer.method.model.parameters())
    state = decode_checkpoint((tmp_path / CHECKPOINT_NAME).read_bytes(), tmp_path)
    scaler = state["scaler"]
    if precision == "fp16":
        assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    else:
        assert scaler == {}


def test_auto_records_the_choice(tiny_backbone, tmp_path, tiny_config, monkeypatch):
    for fast, chosen in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision_module, "has_fast_bf16", lambda device, fast=fast: fast)
        out = tmp_path / chosen
        results = train(tiny_config("seq-frozen", tiny_backbone.name, precision="auto", epochs=1), out,
                        backbone=tiny_backbone)
        assert results["precision"] == chosen and results["precision_requested"] == "auto"
        assert json.loads((out / "results.json").read_text())["config"]["precision"] == chosen


def test_default_precision_is_auto_and_resolves_by_hardware(tiny_backbone, tmp_path, tiny_config, monkeypatch):
    """The default is 'auto': a run without --precision trains exactly as one asking for the hardware's choice."""
    assert RunConfig().precision == "auto" and RunConfig().compile is False
    chosen = precision_module.resolve_precision("auto", torch.device("cpu"))
    assert chosen == ("bf16" if precision_module.has_fast_bf16(torch.device("cpu")) else "fp32")
    a = train(tiny_config("l2p", tiny_backbone.name, precision=RunConfig().precision), tmp_path / "a",
              backbone=tiny_backbone)
    b = train(tiny_config("l2p", tiny_backbone.name, precision=chosen), tmp_path / "b", backbone=tiny_backbone)
    assert a["precision"] == chosen and a["precision_requested"] == "auto"
    assert a["accuracy_matrix"] == b["accuracy_matrix"]


@pytest.mark.parametrize("precision,stop", [("fp16", 13), ("bf16", 7)])
def test_mixed_precision_resume_is_exact(precision, stop, tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("l2p", tiny_backbone.name, precision=precision, checkpoint_every=3)
    full = Trainer(cfg, tmp_path / "full", backbone=tiny_backbone)
    expected = full.run()
    with pytest.raises(Interrupted):
        Trainer(cfg, tmp_path / "cut", backbone=tiny_backbone, step_hook=interrupt_after(stop)).run()
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, backbone=tiny_backbone)
    got = resumed.run()
    assert got["accuracy_matrix"] == expected["accuracy_matrix"]
    assert got["prompt_counts_train"] == expected["prompt_counts_train"]
    for (name, p), q in zip(full.method.model.named_parameters(), resumed.method.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_restore_scaler_checks_the_state(tmp_path):
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    good = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()
    restore_scaler(enabled, good, tmp_path, started=True)
    assert enabled.get_scale() == 1024.0
    restore_scaler(disabled, {}, tmp_path, started=True)
    restore_scaler(torch.amp.GradScaler("cpu"), {}, tmp_path, started=False)  # a run that has not stepped yet
    for bad in ({}, {**good, "scale": float("inf")}, {**good, "scale": -1.0}, {**good, "_growth_tracker": 0.5}, [1]):
        with pytest.raises(CheckpointError, match="loss-scaler state"):
            restore_scaler(torch.amp.GradScaler("cpu"), bad, tmp_path, started=True)
    with pytest.raises(CheckpointError, match="does not scale the loss"):
        restore_scaler(disabled, good, tmp_path, started=True)


def test_compile_run_matches_eager(tiny_backbone, tmp_path, tiny_config):
    eager = Trainer(tiny_config("l2p", tiny_backbone.name, epochs=1), tmp_path / "eager", backbone=tiny_backbone)
    eager.run()
    compiled = Trainer(tiny_config("l2p", tiny_backbone.name, epochs=1, compile=True), tmp_path / "compiled",
                       backbone=tiny_backbone)
    b = compiled.run()
    assert b["compile"] is True
    # same state-dict keys (the instance's forward is compiled, not the module wrapped)
    assert list(compiled.method.model_state()) == list(eager.method.model_state())
    for (name, p), q in zip(eager.method.model.named_parameters(), compiled.method.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compiled_vit_step_matches_eager(backend, precision, tol, tiny_vit):
    """One L2P step of a tiny ViT: torch.compile (inductor) of the forward gives eager's loss and gradients
    within rtol = tol, atol = tol / 10 (fp32: 1e-4, inductor may reorder sums; bf16 autocast: 2e-2, it may also
    fuse casts)."""
    from l2p_fast.models import L2PViT
    from l2p_fast.models.precision import autocast

    torch.manual_seed(1)
    model = L2PViT.from_timm(tiny_vit.copy(), num_classes=4, pool_size=6, top_k=2, length=2, backend=backend,
                             final_tokens="head")
    x = torch.randn(3, 3, 16, 16)

    def step(forward):
        model.zero_grad(set_to_none=True)
        with autocast(precision, torch.device("cpu")):
            out = forward(x, train=True)
        loss = torch.nn.functional.cross_entropy(out["logits"].float(), torch.tensor([0, 1, 3])) - 0.1 * out[
            "reduce_sim"]
        loss.backward()
        return loss.detach(), out["prompt_idx"], [p.grad.clone() for p in model.trainable_parameters()]

    loss, idx, grads = step(model.forward)
    c_loss, c_idx, c_grads = step(torch.compile(model.forward))
    assert torch.equal(idx, c_idx)
    torch.testing.assert_close(c_loss, loss, rtol=tol, atol=tol / 10)
    for got, want in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol / 10)
