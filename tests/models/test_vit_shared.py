"""The first block shared by the query pass and the prompted pass (``block_with_frozen_rows``)."""

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="timm is not installed")

from timm.models.vision_transformer import Block  # noqa: E402

import l2p_fast.models.vit as vit_module  # noqa: E402
from l2p_fast.models import L2PViT  # noqa: E402
from l2p_fast.models.vit_rows import block_from_qkv, block_with_frozen_rows, first_qkv, supports_shared_rows  # noqa: E402
from l2p_fast.testing import tiny_vit  # noqa: E402

LP, M, K = 3, 6, 2
P = K * LP
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def timm_block(fused: bool, qk_norm: bool) -> Block:
    torch.manual_seed(0)
    block = Block(64, 4, qkv_bias=True, qk_norm=qk_norm, init_values=0.5 if qk_norm else None)
    block.attn.fused_attn = fused
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return block.eval()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_block_from_frozen_rows_equals_block(fused: bool, qk_norm: bool) -> None:
    block = timm_block(fused, qk_norm).requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1 + P + 20, 64, generator=gen)
    grad = torch.randn(3, 1 + P + 20, 64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(block_from_qkv(block, x, first_qkv(block, x)), block(x), **TIGHT)
        frozen_qkv = first_qkv(block, torch.cat([x[:, :1], x[:, 1 + P :]], dim=1))
    # gradients reach the new rows only, and equal those of the full block
    new = x[:, 1 : 1 + P].clone().requires_grad_(True)
    ours = block_with_frozen_rows(block, torch.cat([x[:, :1], new, x[:, 1 + P :]], dim=1), frozen_qkv, 1, 1 + P)
    ours.backward(grad)
    full_in = x.clone().requires_grad_(True)
    expected = block(full_in)
    expected.backward(grad)
    torch.testing.assert_close(ours, expected, **TIGHT)
    torch.testing.assert_close(new.grad, full_in.grad[:, 1 : 1 + P], rtol=1e-5, atol=1e-5)


def spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = vit_module.block_with_frozen_rows

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(vit_module, "block_with_frozen_rows", counted)
    return calls


def train_step(model: L2PViT, x: torch.Tensor) -> tuple[dict, dict]:
    out = model(x, train=True)
    loss = nn.functional.cross_entropy(out["logits"], torch.tensor([1, 3, 5, 7])) - 0.1 * out["reduce_sim"]
    loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("final_tokens", ["all", "head"])
@pytest.mark.parametrize("head_type", ["prompt", "token", "token+prompt", "gap"])
def test_sharing_equals_recomputing(monkeypatch, head_type: str, final_tokens: str) -> None:
    kwargs = {"length": LP, "pool_size": M, "top_k": K, "head_type": head_type, "final_tokens": final_tokens}
    shared = L2PViT.from_timm(tiny_vit(seed=2), **kwargs).train()
    with torch.no_grad():
        shared.pos_embed[:, 1 : 1 + P].add_(0.1 * torch.randn(P, 64))
    plain = copy.deepcopy(shared)
    plain.share_first_block = False
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    calls = spy(monkeypatch)
    out_plain, grads_plain = train_step(plain, x)
    assert calls == []
    out_shared, grads_shared = train_step(shared, x)
    assert calls == [1]  # the shared path ran
    torch.testing.assert_close(out_shared["prompt_idx"], out_plain["prompt_idx"], rtol=0, atol=0)
    for key in ("logits", "pre_logits", "x", "reduce_sim"):
        torch.testing.assert_close(out_shared[key], out_plain[key], **TIGHT, msg=key)
    assert set(grads_shared) == set(grads_plain) == {"prompt.prompt", "prompt.prompt_key", "head.weight", "head.bias"}
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_shared[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_no_sharing_where_it_would_be_wrong(monkeypatch) -> None:
    calls = spy(monkeypatch)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    kwargs = {"length": LP, "pool_size": M, "top_k": K}
    depth1 = L2PViT.from_timm(tiny_vit(seed=2, depth=1), **kwargs)
    depth1(x)  # the first block is the last: nothing to share
    unfrozen = L2PViT.from_timm(tiny_vit(seed=2), **kwargs).requires_grad_(True)
    out = unfrozen(x)  # the patch embedding and the first block want gradients
    out["logits"].sum().backward()
    assert unfrozen.patch_embed.proj.weight.grad is not None and unfrozen.blocks[0].attn.qkv.weight.grad is not None
    given = L2PViT.from_timm(tiny_vit(seed=2), **kwargs)
    given(x, cls_features=torch.randn(2, 64))  # no query pass here
    gated = L2PViT.from_timm(tiny_vit(seed=2), **kwargs)
    gated.blocks[0].attn.gate = nn.Linear(64, 64)
    assert not supports_shared_rows(gated.blocks[0])
    gated(x)
    assert calls == []
    with torch.no_grad():  # without gradients even an unfrozen model shares
        unfrozen(x)
    assert calls == [1]
