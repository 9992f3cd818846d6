"""Each fused backend (the ``fused_backend_device`` fixture) swapped into a tiny prompted ViT training step
(timm, random weights, docs/behaviour.md §5 layout): loss and gradients match backend='reference'."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2p_fast import FusedPromptPool

timm = pytest.importorskip("timm", reason="timm is not installed")
WIDTH, LENGTH, POOL, TOP_K, CLASSES = 24, 2, 6, 3, 5


class TinyPromptedViT(nn.Module):
    """patch_embed → pool(x_embed, cls_features) → [CLS, prompts, patches] + pos → blocks → norm → head
    on the mean of the prompt tokens; the query is the CLS feature of the frozen prompt-free ViT."""

    def __init__(self, backend: str, embedding_key: str, train_patch_embed: bool, batchwise: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=16, patch_size=4, embed_dim=WIDTH, depth=2, num_heads=2, num_classes=0)
        self.vit.requires_grad_(False)
        self.vit.patch_embed.requires_grad_(train_patch_embed)
        self.pool = FusedPromptPool(length=LENGTH, embed_dim=WIDTH, embedding_key=embedding_key, prompt_pool=True,
                                    prompt_key=True, pool_size=POOL, top_k=TOP_K, batchwise_prompt=batchwise,
                                    backend=backend)
        patches = self.vit.patch_embed.num_patches
        self.pos = nn.Parameter(torch.randn(1, 1 + TOP_K * LENGTH + patches, WIDTH) * 0.02, requires_grad=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            cls_features = self.vit.forward_features(images)[:, 0]
        x_embed = self.vit.patch_embed(images)
        out = self.pool(x_embed, cls_features=cls_features)
        cls = self.vit.cls_token.expand(images.shape[0], -1, -1)
        seq = torch.cat([cls, out["prompted_embedding"]], dim=1) + self.pos
        seq = self.vit.norm(self.vit.blocks(seq))
        logits = self.head(seq[:, 1:1 + out["total_prompt_len"]].mean(dim=1))
        return logits, out["reduce_sim"], out["prompt_idx"]


@pytest.mark.parametrize(("embedding_key", "train_patch_embed", "batchwise"),
                         [("cls", False, True), ("cls", False, False), ("mean_max", True, True)])
def test_training_step_matches_reference(fused_backend_device: tuple[str, str], embedding_key: str,
                                         train_patch_embed: bool, batchwise: bool) -> None:
    backend, device = fused_backend_device
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 16, 16, generator=gen).to(device)
    labels = torch.randint(0, CLASSES, (6,), generator=gen).to(device)
    results = {}
    for run in ("reference", backend):
        model = TinyPromptedViT(run, embedding_key, train_patch_embed, batchwise).to(device)
        logits, reduce_sim, idx = model(images)
        loss = F.cross_entropy(logits, labels) - 0.1 * reduce_sim
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results[run] = (loss.detach(), grads, idx)
    ref_loss, ref_grads, ref_idx = results["reference"]
    got_loss, got_grads, idx = results[backend]
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    expected_names = {"pool.prompt", "pool.prompt_key", "head.weight", "head.bias"}
    if train_patch_embed:
        expected_names |= {"vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias"}
    assert set(got_grads) == set(ref_grads) == expected_names
    for name, expected in ref_grads.items():
        assert expected is not None and expected.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], expected, rtol=1e-4, atol=1e-6, msg=name)
