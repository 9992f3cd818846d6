"""The Triton pool inside a small prompted ViT training step: same loss and gradients as the reference.

The prompted ViT is built inline from a random-weight timm VisionTransformer (SPEC §5 layout):
patch_embed → pool(x_embed, cls_features=frozen CLS feature) → [CLS, prompts, patches] + positions
(prompt slots get the CLS position) → blocks → norm → head on the mean of the prompt tokens.
"""

import pytest
import torch
from torch import nn

from l2p_fast import FusedPromptPool
from l2p_fast.dispatch import unavailable_reason

timm = pytest.importorskip("timm", reason="timm is not installed")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")


def _prompted_vit_loss(vit: VisionTransformer, pool: FusedPromptPool, images: torch.Tensor, labels: torch.Tensor):
    with torch.no_grad():
        cls_features = vit.forward_features(images)[:, 0]  # the frozen, prompt-free query
    x_embed = vit.patch_embed(images)
    out = pool(x_embed, cls_features=cls_features)
    prompt_tokens = out["total_prompt_len"]
    batch = images.shape[0]
    cls_pos = vit.pos_embed[:, :1]
    pos = torch.cat([cls_pos, cls_pos.expand(-1, prompt_tokens, -1), vit.pos_embed[:, 1:]], dim=1)
    seq = torch.cat([vit.cls_token.expand(batch, -1, -1), out["prompted_embedding"]], dim=1) + pos
    seq = vit.norm(vit.blocks(seq))
    logits = vit.head(seq[:, 1 : 1 + prompt_tokens].mean(dim=1))
    return nn.functional.cross_entropy(logits, labels) - 0.1 * out["reduce_sim"], out


@pytest.mark.parametrize("batchwise", [False, True])
def test_prompted_vit_training_step_matches_reference(batchwise: bool) -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5,
                            class_token=True, global_pool="token").to(DEVICE)
    for name, param in vit.named_parameters():
        param.requires_grad_(name.startswith("head"))
    pool_ref = FusedPromptPool(length=2, embed_dim=24, embedding_key="cls", prompt_pool=True, prompt_key=True,
                               pool_size=7, top_k=3, batchwise_prompt=batchwise, backend="reference").to(DEVICE)
    pool_tri = FusedPromptPool(length=2, embed_dim=24, embedding_key="cls", prompt_pool=True, prompt_key=True,
                               pool_size=7, top_k=3, batchwise_prompt=batchwise, backend="triton").to(DEVICE)
    pool_tri.load_state_dict(pool_ref.state_dict())
    images = torch.rand(6, 3, 16, 16, device=DEVICE)
    labels = torch.randint(0, 5, (6,), device=DEVICE)
    results = []
    for pool in (pool_ref, pool_tri):
        vit.zero_grad(set_to_none=True)
        loss, out = _prompted_vit_loss(vit, pool, images, labels)
        loss.backward()
        results.append((loss.detach(), out["prompt_idx"], pool.prompt.grad, pool.prompt_key.grad,
                        vit.head.weight.grad.clone()))
    (loss_r, idx_r, gp_r, gk_r, gh_r), (loss_t, idx_t, gp_t, gk_t, gh_t) = results
    assert torch.equal(idx_t, idx_r)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp_t, gp_r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gk_t, gk_r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gh_t, gh_r, rtol=1e-4, atol=1e-6)
    assert gp_t.abs().sum() > 0 and gk_t.abs().sum() > 0
