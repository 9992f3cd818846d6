"""Helpers shared by the prompted models: module walk, eval-mode context, head rows."""

import pytest
import torch
from torch import nn

from l2p_fast.models.common import eval_mode, head_rows, pool_rows, pool_tokens, walk_modules


def _net() -> nn.Module:
    inner = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    return nn.Sequential(nn.LayerNorm(4), inner)


def test_walk_modules_equals_modules() -> None:
    net = _net()
    assert list(walk_modules(net)) == list(net.modules())


def test_eval_mode_switches_and_restores_every_flag() -> None:
    net = _net().train()
    net[1][2].eval()  # a mixed state must come back as it was
    before = [m.training for m in net.modules()]
    x = torch.randn(64, 4)
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
        assert torch.equal(net(x), net(x))  # dropout is off inside
    assert [m.training for m in net.modules()] == before
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == before


@pytest.mark.parametrize("head_type", ["token", "prompt", "token+prompt", "gap"])
def test_head_rows_pool_like_pool_tokens(head_type: str) -> None:
    x = torch.randn(3, 1 + 6 + 9, 5)
    start, stop = head_rows(head_type, 6, x.shape[1])
    torch.testing.assert_close(pool_rows(x[:, start:stop], head_type), pool_tokens(x, head_type, 6))
