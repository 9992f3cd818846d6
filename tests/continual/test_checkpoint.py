"""The checkpoint file: digest-verified (one flipped bit is an error), every field checked, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import io
import math
import struct

import pytest
import torch

from l2p_fast.continual import output
from l2p_fast.continual.checkpoint import (
    MAGIC,
    CheckpointError,
    check_run_state,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

MARK = 1.2345678  # a value whose fp32 bytes are easy to find in the file


def small_state(**changes):
    state = {
        "config_fingerprint": "c1", "backbone_fingerprint": "b1", "position": {"phase": 1}, "optimizer": {},
        "model": {"w": torch.full((256,), MARK)}, "method": {"buffer": None},
    }
    state.update(changes)
    return state


def test_round_trip_and_identity_errors(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", small_state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temporary file left behind
    assert path.read_bytes().startswith(MAGIC)
    loaded = load_checkpoint(path, "c1", "b1")
    assert torch.equal(loaded["model"]["w"], torch.full((256,), MARK)) and loaded["position"] == {"phase": 1}
    with pytest.raises(CheckpointError, match="another configuration"):
        load_checkpoint(path, "c2", "b1")
    with pytest.raises(CheckpointError, match="other backbone"):
        load_checkpoint(path, "c1", "b2")
    (tmp_path / "other.pt").write_bytes(encode_checkpoint(small_state()).replace(b"checkpoint/2", b"checkpoint/9"))
    with pytest.raises(CheckpointError, match="cannot be read"):  # the edit changes the digest
        load_checkpoint(tmp_path / "other.pt", "c1", "b1")


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty"),
        (b"not a checkpoint at all", "no checkpoint header"),
        (MAGIC + b"abc", "cut short"),
    ],
)
def test_unreadable_files(content, reason, tmp_path):
    (tmp_path / "ck.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"cannot be read: .*{reason}"):
        load_checkpoint(tmp_path / "ck.pt", "c1", "b1")


def test_plain_torch_files_and_pickles_are_refused(tmp_path):
    torch.save(small_state(format="l2p_fast.continual.checkpoint/1"), tmp_path / "v1.pt")  # the digest-less format
    with pytest.raises(CheckpointError, match="no checkpoint header"):
        load_checkpoint(tmp_path / "v1.pt", "c1", "b1")
    # a framed payload with objects that weights_only refuses is an error, never executed
    buffer = io.BytesIO()
    torch.save({"format": "x", "evil": object}, buffer)
    payload = buffer.getvalue()
    (tmp_path / "pickle.pt").write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "pickle.pt", "c1", "b1")
    data = save_checkpoint(tmp_path / "ck.pt", small_state()).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="digest does not match"):
        load_checkpoint(tmp_path / "cut.pt", "c1", "b1")


def test_one_flipped_bit_anywhere_is_an_error(tmp_path):
    data = encode_checkpoint(small_state())
    storage = data.index(struct.pack("<f", MARK) * 4)
    header = len(MAGIC) + 64 + 1
    offsets = [0, 5, len(MAGIC) + 3, header - 1, header, header + 40, storage, storage + 517, len(data) // 2,
               len(data) - 30, len(data) - 1]
    # the premise: torch.load alone does not notice a flipped bit in a tensor's storage
    flipped = bytearray(data[header:])
    flipped[storage - header] ^= 0x10
    changed = torch.load(io.BytesIO(bytes(flipped)), weights_only=True)["model"]["w"]
    assert not torch.equal(changed, torch.full((256,), MARK))
    for offset in offsets:
        for bit in (0, 7):
            bad = bytearray(data)
            bad[offset] ^= 1 << bit
            (tmp_path / "ck.pt").write_bytes(bytes(bad))
            with pytest.raises(CheckpointError, match="cannot be read"):
                load_checkpoint(tmp_path / "ck.pt", "c1", "b1")


def test_non_finite_saved_state_is_an_error(tmp_path):
    for part, value in [("model", {"prompt_key": torch.tensor([1.0, math.nan])}),
                        ("optimizer", {"state": {0: {"exp_avg": torch.tensor([math.inf])}}, "param_groups": []}),
                        ("method", {"fisher": {"w": torch.tensor([-math.inf])}})]:
        save_checkpoint(tmp_path / "ck.pt", small_state(**{part: value}))
        with pytest.raises(CheckpointError, match=f"{part}.*NaN or inf"):
            load_checkpoint(tmp_path / "ck.pt", "c1", "b1")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ck.pt", small_state())
    before = path.read_bytes()

    def full(file, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "_write_all", full)
    with pytest.raises(CheckpointError, match="cannot be written .*No space left on device.*previous checkpoint"):
        save_checkpoint(path, small_state(position={"phase": 2}))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


PLAN = dict(batches_per_epoch=[4, 4, 4], epochs=2, evaluated_tasks=[(0,), (0, 1), (0, 1, 2)], num_tasks=3, pool_size=5)


def run_state(**changes):
    state = {
        "position": {"phase": 1, "epoch": 1, "step": 2, "global_step": 14},
        "rows": [[75.0]],
        "counts_train": torch.zeros(3, 5, dtype=torch.long),
        "counts_test": torch.zeros(3, 5, dtype=torch.long),
        "elapsed": {"train": 1.5, "eval": 0.25, "setup": 2.0, "examples": 40},
        "rng": torch.get_rng_state(),
        "optimizer": {"state": {}, "param_groups": []},
    }
    state.update(changes)
    return state


def test_run_state_inside_the_plan_is_accepted():
    assert check_run_state(run_state(), "ck.pt", **PLAN)["global_step"] == 14
    finished = run_state(position={"phase": 3, "epoch": 0, "step": 0, "global_step": 24}, optimizer={},
                         rows=[[75.0], [50.0, 25.0], [0.0, 100.0, 12.5]])
    assert check_run_state(finished, "ck.pt", **PLAN)["phase"] == 3
    end_of_epoch = run_state(position={"phase": 0, "epoch": 1, "step": 4, "global_step": 8}, rows=[])
    assert check_run_state(end_of_epoch, "ck.pt", **PLAN)["step"] == 4


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"position": {"phase": 99, "epoch": 0, "step": 0, "global_step": 0}}, "outside this run's plan"),
        ({"position": {"phase": 1, "epoch": 0, "step": -5, "global_step": 3}}, "outside this run's plan"),
        ({"position": {"phase": 1, "epoch": 2, "step": 0, "global_step": 16}}, "outside this run's plan"),
        ({"position": {"phase": 1, "epoch": 1, "step": 5, "global_step": 17}}, "outside this run's plan"),
        ({"position": {"phase": 1, "epoch": 1, "step": 2, "global_step": 15}}, "global_step is 15"),
        ({"position": {"phase": 1, "epoch": 1, "step": 2.0, "global_step": 14}}, "position must be integers"),
        ({"position": {"phase": 1, "epoch": 1, "step": 2}}, "position must be integers"),
        ({"rows": []}, "expected 1 accuracy rows"),
        ({"rows": [[75.0], [50.0, 50.0]]}, "expected 1 accuracy rows"),
        ({"rows": [[math.nan]]}, "accuracy row 0"),
        ({"rows": [[175.0]]}, "accuracy row 0"),
        ({"rows": [[75.0, 20.0]]}, "accuracy row 0"),
        ({"counts_train": torch.zeros(3, 4, dtype=torch.long)}, "counts_train must be"),
        ({"counts_test": torch.full((3, 5), -1, dtype=torch.long)}, "counts_test must be"),
        ({"elapsed": {"train": math.nan, "eval": 0.0, "setup": 0.0, "examples": 0}}, r"elapsed\['train'\]"),
        ({"elapsed": {"train": "1 h", "eval": 0.0, "setup": 0.0, "examples": 0}}, r"elapsed\['train'\]"),
        ({"elapsed": {"train": 1.0, "eval": -3.0, "setup": 0.0, "examples": 0}}, r"elapsed\['eval'\]"),
        ({"elapsed": {"train": 1.0, "eval": 0.0, "setup": 0.0, "examples": 2.5}}, r"elapsed\['examples'\]"),
        ({"elapsed": {"train": 1.0}}, "elapsed must hold"),
        ({"rng": torch.zeros(3, dtype=torch.uint8)}, "rng must be"),
        ({"optimizer": {}}, "needs the optimiser state"),
    ],
)
def test_edited_run_state_is_an_error(changes, match):
    with pytest.raises(CheckpointError, match=match):
        check_run_state(run_state(**changes), "ck.pt", **PLAN)
