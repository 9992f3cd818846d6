"""What stops a run instead of giving silently wrong results: non-finite losses and gradients, edited or
damaged checkpoints, a second run on the same output folder, a backend this machine lacks."""

from __future__ import annotations

import errno
import json
import math
import threading

import pytest
import torch

from l2p_fast.continual import output
from l2p_fast.continual.batching import generator, train_batches
from l2p_fast.continual.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    load_checkpoint,
)
from l2p_fast.continual.config import RunConfig
from l2p_fast.continual.output import OutputError, run_lock, write_bytes_atomic
from l2p_fast.continual.preflight import check_backend
from l2p_fast.continual.trainer import NonFiniteLossError, Trainer, train


def image_tensor_file(path, nan_row=None, channels=3, size=16):
    gen = torch.Generator().manual_seed(0)

    def split(per_class):
        y = torch.arange(4).repeat_interleave(per_class)
        return {"x": torch.rand(len(y), channels, size, size, generator=gen), "y": y}

    data = {"train": split(4), "test": split(2), "classes": ["a", "b", "c", "d"]}
    if nan_row is not None:
        data["train"]["x"][nan_row, 0, 3, 5] = math.nan
    torch.save(data, path)
    return str(path)


def vision_config(data, **overrides):
    values = dict(method="seq-frozen", benchmark="tensor_file", data=data, classes_per_task=2, epochs=1, batch_size=4,
                  progress=False, checkpoint_every=1, num_threads=1, seed=0)
    values.update(overrides)
    return RunConfig(**values)


def test_nan_pixel_stops_before_the_step_and_keeps_the_last_good_checkpoint(tiny_vit, tmp_path):
    # task 0 holds source rows 0..7 as pool items 0..7; put the NaN into the second batch of the first epoch
    row = int(train_batches(torch.arange(8), 4, generator(0, "epoch", 0, 0))[1][0])
    data = image_tensor_file(tmp_path / "nan.pt", nan_row=row)
    trainer = Trainer(vision_config(data), tmp_path / "run", backbone=tiny_vit)
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.run()
    message = str(caught.value)
    assert "non-finite loss nan in task 1 of 2, epoch 1 of 1, step 2 of 2;" in message
    assert f"nan.pt train row {row})" in message and "The optimiser step was not taken" in message
    assert all(bool(torch.isfinite(p).all()) for p in trainer.method.model.parameters())
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, trainer.config.fingerprint(),
                            trainer.backbone_fingerprint)  # finite, digest intact
    assert state["position"]["global_step"] == 1  # the step before the NaN batch
    assert not (tmp_path / "run" / "results.json").exists()
    # fixed data + --resume gives exactly the run that never saw the NaN
    image_tensor_file(tmp_path / "nan.pt")
    resumed = Trainer(vision_config(data), tmp_path / "run", resume=True, backbone=tiny_vit)
    clean = Trainer(vision_config(data), tmp_path / "clean", backbone=tiny_vit)
    assert resumed.run()["accuracy_matrix"] == clean.run()["accuracy_matrix"]
    for (name, value), other in zip(resumed.method.model_state().items(), clean.method.model_state().values(),
                                    strict=True):
        assert torch.equal(value, other), name


@pytest.mark.parametrize("clip_grad", [1.0, 0.0])
def test_non_finite_gradient_with_a_finite_loss_stops_the_run(clip_grad, tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("seq-frozen", tiny_backbone.name, clip_grad=clip_grad)
    trainer = Trainer(cfg, tmp_path, backbone=tiny_backbone)
    trainer._setup()
    original = trainer.method.loss

    def loss_with_nan_gradient(out, labels, mask):
        loss, parts = original(out, labels, mask)
        weight = trainer.method.model.head.weight
        return loss + 0.0 * torch.sqrt((weight - weight.detach()).abs()).sum(), parts  # value finite, grad NaN

    trainer.method.loss = loss_with_nan_gradient
    trainer._setup = lambda: None
    before = [p.detach().clone() for p in trainer.method.model.parameters()]
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm nan in task 1 of 5, epoch 1 of 2, step 1 "):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.method.model.parameters(), strict=True))


class Stop(Exception):
    pass


def test_nan_in_a_test_item_stops_the_evaluation(tiny_vit, tmp_path):
    data = image_tensor_file(tmp_path / "clean.pt")
    obj = torch.load(data, weights_only=True)
    obj["test"]["x"][3, 1, 0, 0] = math.inf
    torch.save(obj, data)
    with pytest.raises(NonFiniteLossError, match=r"evaluation after task 1 of 2: non-finite logits .*clean.pt test row 3"):
        train(vision_config(data), tmp_path / "run", backbone=tiny_vit)


def stop_after(n):
    def hook(step):
        if step == n:
            raise Stop

    return hook


def edit_checkpoint(path, edit):
    state = decode_checkpoint(path.read_bytes(), path)
    edit(state)
    path.write_bytes(encode_checkpoint({k: v for k, v in state.items() if k != "format"}))  # a valid digest


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s["position"].update(phase=99), "outside this run's plan"),
        (lambda s: s["position"].update(step=-5), "outside this run's plan"),
        (lambda s: s["rows"].append([100.0]), "accuracy rows"),
        (lambda s: s["elapsed"].update(train="soon"), "elapsed"),
        (lambda s: s["model"]["head.weight"].__setitem__((0, 0), math.nan), "NaN or inf"),
        (lambda s: s["optimizer"]["param_groups"][0].update(lr=5.0), "optimiser settings"),
        (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)), "optimiser tensor 'exp_avg'"),
    ],
)
def test_edited_checkpoint_is_an_error(edit, match, tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("seq-frozen", tiny_backbone.name, checkpoint_every=3)
    with pytest.raises(Stop):
        Trainer(cfg, tmp_path, backbone=tiny_backbone, step_hook=stop_after(6)).run()
    edit_checkpoint(tmp_path / CHECKPOINT_NAME, edit)
    with pytest.raises(CheckpointError, match=match):
        Trainer(cfg, tmp_path, resume=True, backbone=tiny_backbone).run()


@pytest.mark.parametrize(
    "method,edit,match",
    [
        ("ewc", lambda s: s["method"]["fisher"].update({"head.weight": torch.ones(1)}), "fisher of 'head.weight'"),
        ("ewc", lambda s: s["method"]["anchor"].update({"head.bias": torch.ones(3, 2)}), "anchor of 'head.bias'"),
        ("er", lambda s: s["method"]["buffer"].update(indices=torch.tensor([0, 10**6])), "replay buffer indices"),
    ],
)
def test_edited_method_state_is_an_error(method, edit, match, tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config(method, tiny_backbone.name, checkpoint_every=5)
    with pytest.raises(Stop):  # after task 1 (8 steps): Fisher, anchor and buffer hold task 1
        Trainer(cfg, tmp_path, backbone=tiny_backbone, step_hook=stop_after(10)).run()
    edit_checkpoint(tmp_path / CHECKPOINT_NAME, edit)
    with pytest.raises(CheckpointError, match=match):
        Trainer(cfg, tmp_path, resume=True, backbone=tiny_backbone).run()


def test_flipped_bit_in_a_run_checkpoint_is_an_error(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("seq-frozen", tiny_backbone.name)
    train(cfg, tmp_path, backbone=tiny_backbone)
    path = tmp_path / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    head = decode_checkpoint(bytes(data), path)["model"]["head.weight"]
    offset = bytes(data).index(head.flatten()[:4].numpy().tobytes())  # inside the head's storage
    data[offset + 1] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest does not match"):
        Trainer(cfg, tmp_path, resume=True, backbone=tiny_backbone).run()


def test_one_run_per_output_folder(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("seq-frozen", tiny_backbone.name)
    with run_lock(tmp_path):
        with pytest.raises(OutputError, match=r"in use by another run \(pid \d+ on host .*, started 20"):
            Trainer(cfg, tmp_path, backbone=tiny_backbone)
    trainer = Trainer(cfg, tmp_path, backbone=tiny_backbone)
    with run_lock(tmp_path):  # taken between construction and run
        with pytest.raises(OutputError, match="in use by another run"):
            trainer.run()
    assert not (tmp_path / "results.json").exists()
    train(cfg, tmp_path, backbone=tiny_backbone)  # the lock is free again
    with run_lock(tmp_path):  # a busy folder is reported as busy, not as holding an earlier run
        with pytest.raises(OutputError, match="in use by another run"):
            Trainer(cfg, tmp_path, resume=True, backbone=tiny_backbone)
    (tmp_path / CHECKPOINT_NAME).unlink()  # a finished run without its checkpoint
    with pytest.raises(OutputError, match="already holds an earlier run \\(results.json\\)"):
        Trainer(cfg, tmp_path, backbone=tiny_backbone)
    with pytest.raises(OutputError, match="no checkpoint.pt to resume from"):
        Trainer(cfg, tmp_path, resume=True, backbone=tiny_backbone)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "comparison.json").write_text("{}")
    with pytest.raises(OutputError, match="comparison.json"):
        Trainer(cfg, tmp_path / "other", backbone=tiny_backbone)
    with pytest.raises(ValueError, match="output: expected a folder path, got ''"):
        Trainer(cfg, "", backbone=tiny_backbone)


def test_a_killed_run_leaves_no_temporary_files_behind(tmp_path):
    leftover = tmp_path / f"{output.TEMP_PREFIX}checkpoint.pt.abc123"
    leftover.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("the user's own file")
    with run_lock(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".l2p-fast.lock", "notes.tmp"]


def test_concurrent_writers_use_their_own_temporary_files(tmp_path):
    target = tmp_path / "shared.json"
    errors = []

    def writer(n):
        try:
            for _ in range(30):
                write_bytes_atomic(target, json.dumps({"writer": n}).encode())
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(target.read_text())["writer"] in range(4)
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]


def test_backend_unavailable_here_is_refused_before_loading(tiny_backbone, tmp_path, tiny_config):
    from l2p_fast import dispatch

    missing = [b for b in ("cuda", "triton", "cpu") if dispatch.unavailable_reason(b, "cpu") is not None]
    if not missing:
        pytest.skip("every backend runs on the CPU here")
    for method in ("l2p", "dualprompt", "coda-prompt"):  # every method whose model runs fused ops
        cfg = tiny_config(method, tiny_backbone.name, backend=missing[0], device="cpu")
        with pytest.raises(ValueError, match=f"backend: '{missing[0]}' cannot run on the cpu device here"):
            Trainer(cfg, tmp_path, backbone=tiny_backbone)
    check_backend(tiny_config("seq", tiny_backbone.name, backend=missing[0]), torch.device("cpu"))  # not a pool method
    assert not any(tmp_path.iterdir())


def test_images_of_the_wrong_shape_are_refused(tiny_vit, tmp_path):
    for channels, size in [(1, 16), (3, 8)]:
        data = image_tensor_file(tmp_path / f"x{channels}_{size}.pt", channels=channels, size=size)
        with pytest.raises(ValueError, match=rf"gives inputs of shape \({channels}, {size}, {size}\).*\(3, 16, 16\)"):
            train(vision_config(data), tmp_path / f"run{channels}_{size}", backbone=tiny_vit)


def fill_disk_at_checkpoint(monkeypatch):
    """From the first checkpoint write on, every file write fails with ENOSPC."""
    from l2p_fast.continual import checkpoint

    def full(file, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def write(path, data):
        monkeypatch.setattr(output, "_write_all", full)
        return output.write_bytes_atomic(path, data)

    monkeypatch.setattr(checkpoint, "write_bytes_atomic", write)


def test_full_disk_during_a_run_is_a_clear_error(tiny_backbone, tmp_path, monkeypatch, tiny_config):
    fill_disk_at_checkpoint(monkeypatch)
    with pytest.raises(CheckpointError, match="cannot be written \\(No space left on device\\)"):
        train(tiny_config("seq-frozen", tiny_backbone.name), tmp_path, backbone=tiny_backbone)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".l2p-fast.lock", "cache"]
