"""Row-only last block: ``block_rows`` against the full timm block, ``final_tokens='head'`` against 'all'."""

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="timm is not installed")

from timm.models.vision_transformer import Block, ParallelScalingBlock, VisionTransformer  # noqa: E402

from l2p_fast.models import L2PViT  # noqa: E402
from l2p_fast.models.common import head_rows  # noqa: E402
from l2p_fast.models.vit_rows import block_rows, blocks_rows, supports_rows  # noqa: E402
from l2p_fast.testing import tiny_vit  # noqa: E402

LP, M, K = 3, 6, 2
P = K * LP  # prompt rows
N = 1 + P + 64  # prompted sequence length
RANGES = {"token": (0, 1), "prompt": (1, 1 + P), "token+prompt": (0, 1 + P), "gap": (0, N), "inner": (5, 17)}
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def timm_block(fused: bool, qk_norm: bool, gated: bool = False, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    block = Block(64, 4, qkv_bias=True, qk_norm=qk_norm, scale_attn_norm=qk_norm, init_values=0.5 if qk_norm else None)
    block.attn.fused_attn = fused
    if gated:
        block.attn.gate = nn.Linear(64, 64)
    with torch.no_grad():  # non-trivial norms, so a wrong row in any of them shows
        for m in block.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return block.eval()


@pytest.mark.parametrize("rows", sorted(RANGES))
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_block_rows_equal_full_block_rows(rows: str, fused: bool, qk_norm: bool) -> None:
    block = timm_block(fused, qk_norm, gated=qk_norm and not fused)
    assert supports_rows(block)
    start, stop = RANGES[rows]
    x = torch.randn(3, N, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(block_rows(block, x, start, stop), block(x)[:, start:stop], **TIGHT)
    # with gradients: to the input and to every block weight
    grad = torch.randn(3, stop - start, 64, generator=torch.Generator().manual_seed(4))
    x_rows, x_full = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    block_rows(block, x_rows, start, stop).backward(grad)
    rows_grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    block.zero_grad()
    block(x_full)[:, start:stop].backward(grad)
    torch.testing.assert_close(x_rows.grad, x_full.grad, rtol=1e-5, atol=1e-5)
    for name, p in block.named_parameters():
        torch.testing.assert_close(rows_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_block_rows_bf16_autocast() -> None:
    block = timm_block(True, False)
    x = torch.randn(2, N, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = block_rows(block, x, 0, 1 + P), block(x)[:, : 1 + P]
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=3e-2)


class Wrapped(nn.Module):
    """Not timm's Block: block_rows must run it in full."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.inner = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1.5


def test_fallback_cases_run_the_full_block() -> None:
    block = timm_block(True, False)
    x = torch.randn(2, N, 64, generator=torch.Generator().manual_seed(6))
    wrapped = Wrapped(block)
    assert not supports_rows(wrapped)
    assert torch.equal(block_rows(wrapped, x, 1, 1 + P), wrapped(x)[:, 1 : 1 + P])
    block.register_forward_hook(lambda _m, _i, out: out * 2)  # a hook must still run
    assert not supports_rows(block)
    assert torch.equal(block_rows(block, x, 0, 1), block(x)[:, :1])
    with pytest.raises(ValueError, match="start, stop"):
        block_rows(wrapped, x, 3, 3)


def test_stochastic_blocks_fall_back_only_in_training() -> None:
    vit = tiny_vit(drop_path_rate=0.2, attn_drop_rate=0.1)
    assert supports_rows(vit.blocks[-1])  # eval: drop path and dropout are identities
    vit.train()
    assert not supports_rows(vit.blocks[-1])
    assert supports_rows(tiny_vit().train().blocks[-1])  # rates of zero are identities in training too
    x = torch.randn(2, 65, 64)
    torch.manual_seed(7)
    got = blocks_rows(vit.blocks, x, 0, 1)
    torch.manual_seed(7)
    assert torch.equal(got, vit.blocks(x)[:, :1])


def pair(head_type: str, backend: str, vit: VisionTransformer | None = None) -> tuple[L2PViT, L2PViT]:
    """Two models with the same weights, prompts and keys: final_tokens 'all' and 'head', in train mode."""
    vit = tiny_vit(seed=2) if vit is None else vit
    kwargs = {"length": LP, "pool_size": M, "top_k": K, "head_type": head_type, "backend": backend}
    full = L2PViT.from_timm(copy.deepcopy(vit), **kwargs)
    with torch.no_grad():
        full.pos_embed[:, 1 : 1 + P].add_(0.1 * torch.randn(P, 64))  # prompt slots differ from CLS's
    rows = L2PViT.from_timm(copy.deepcopy(vit), final_tokens="head", **kwargs)
    rows.load_state_dict(full.state_dict())
    return full.train(), rows.train()


def step(model: L2PViT, x: torch.Tensor) -> tuple[dict, dict]:
    out = model(x, train=True)
    loss = nn.functional.cross_entropy(out["logits"], torch.tensor([1, 3, 5, 7])) - 0.1 * out["reduce_sim"]
    loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def check_same(full: L2PViT, rows: L2PViT, head_type: str) -> None:
    x = images(4, seed=8)
    out_full, grads_full = step(full, x)
    out_rows, grads_rows = step(rows, x)
    torch.testing.assert_close(out_rows["prompt_idx"], out_full["prompt_idx"], rtol=0, atol=0)
    torch.testing.assert_close(out_rows["reduce_sim"], out_full["reduce_sim"], rtol=0, atol=0)
    torch.testing.assert_close(out_rows["logits"], out_full["logits"], **TIGHT)
    torch.testing.assert_close(out_rows["pre_logits"], out_full["pre_logits"], **TIGHT)
    start, stop = head_rows(head_type, P, N)
    assert out_rows["x"].shape == (4, stop - start, 64) and out_full["x"].shape == (4, N, 64)
    torch.testing.assert_close(out_rows["x"], out_full["x"][:, start:stop], **TIGHT)
    assert set(grads_rows) == set(grads_full) == {"prompt.prompt", "prompt.prompt_key", "head.weight", "head.bias"}
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_rows[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("head_type", ["prompt", "token", "token+prompt", "gap"])
def test_final_tokens_head_equals_all(head_type: str, backend: str) -> None:
    full, rows = pair(head_type, backend)
    assert supports_rows(rows.blocks[-1])  # train mode with zero rates: the row path runs
    check_same(full, rows, head_type)


def test_final_tokens_head_with_unsupported_blocks() -> None:
    vit = tiny_vit(seed=3, block_fn=ParallelScalingBlock)
    full, rows = pair("prompt", "auto", vit=vit)
    assert not supports_rows(rows.blocks[-1])
    check_same(full, rows, "prompt")
    full, rows = pair("token", "auto")
    for model in (full, rows):
        model.blocks[-1] = Wrapped(model.blocks[-1])
    check_same(full, rows, "token")


def test_query_equals_backbone_cls() -> None:
    for vit in (tiny_vit(seed=4), tiny_vit(seed=4, block_fn=ParallelScalingBlock), tiny_vit(depth=1)):
        model = L2PViT.from_timm(vit, length=LP, pool_size=M, top_k=K).train()
        x = images(3, seed=9)
        q = model.query(x)
        assert model.training and not q.requires_grad  # eval inside, flags restored
        with torch.no_grad():
            torch.testing.assert_close(q, model.forward_backbone(x)[:, 0], **TIGHT)


def test_final_tokens_argument() -> None:
    model = L2PViT.from_timm(tiny_vit(), length=LP, pool_size=M, top_k=K, final_tokens="head", head_type="token")
    assert model.final_tokens == "head" and "final_tokens='head'" in repr(model)
    expected = model(images(2))
    assert expected["x"].shape == (2, 1, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2))
    assert out["x"].shape == (2, 1, 64)
    torch.testing.assert_close(out["logits"].float(), expected["logits"], rtol=0, atol=1e-2)  # bf16 through 2 blocks
    with pytest.raises(ValueError, match=r"final_tokens: expected one of \('all', 'head'\), got 'cls'"):
        L2PViT.from_timm(tiny_vit(), final_tokens="cls")
