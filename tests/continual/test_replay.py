"""The class-balanced replay buffer."""

from __future__ import annotations

import pytest
import torch

from l2p_fast.continual.batching import generator
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
