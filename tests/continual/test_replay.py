"""The replay buffer and the checkpoint file format."""

from __future__ import annotations

import pytest
import torch

from l2p_fast.continual.batching import generator
from l2p_fast.continual.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from l2p_fast.continual.methods import ReplayBuffer


def test_buffer_is_class_balanced_and_round_trips():
    labels = torch.tensor([0] * 5 + [1] * 7 + [2] * 1 + [3] * 6)
    buf = ReplayBuffer(3)
    buf.add_task(torch.arange(0, 13), labels, generator(0))
    assert buf.class_counts(labels) == {0: 3, 1: 3, 2: 1}
    buf.add_task(torch.arange(13, 19), labels, generator(1))
    assert buf.class_counts(labels) == {0: 3, 1: 3, 2: 1, 3: 3} and len(buf) == 10
    draw = buf.sample(50, generator(2))
    assert len(draw) == 50 and set(draw.tolist()) <= set(buf.indices.tolist())
    assert torch.equal(draw, buf.sample(50, generator(2)))
    other = ReplayBuffer(3)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.indices, buf.indices)
    with pytest.raises(ValueError, match="per_class=3"):
        ReplayBuffer(4).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="per_class"):
        ReplayBuffer(0)
    assert len(ReplayBuffer(2).sample(4, generator(0))) == 0


def test_checkpoint_round_trip_and_errors(tmp_path):
    state = {
        "config_fingerprint": "c1", "backbone_fingerprint": "b1", "position": {"phase": 1}, "model": {"w": torch.ones(2)},
        "optimizer": {}, "method": {"buffer": None},
    }
    path = save_checkpoint(tmp_path / "ck.pt", state)
    assert not (tmp_path / "ck.pt.tmp").exists()
    loaded = load_checkpoint(path, "c1", "b1")
    assert torch.equal(loaded["model"]["w"], torch.ones(2)) and loaded["position"] == {"phase": 1}
    with pytest.raises(CheckpointError, match="another configuration"):
        load_checkpoint(path, "c2", "b1")
    with pytest.raises(CheckpointError, match="other backbone"):
        load_checkpoint(path, "c1", "b2")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected format"):
        load_checkpoint(tmp_path / "other.pt", "c1", "b1")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "cut.pt", "c1", "b1")
    # objects that weights_only refuses are an error, never executed
    torch.save({"format": "x", "evil": object}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "pickle.pt", "c1", "b1")
