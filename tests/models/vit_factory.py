"""The small random-weight timm ViT the prompted-ViT tests share (img 32, patch 4, D=64, 2 blocks)."""

import torch
from timm.models.vision_transformer import VisionTransformer

SMALL = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 10}


def small_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    """A seeded ViT of ``SMALL`` (``kwargs`` override it) in eval mode, with non-trivial CLS and positions."""
    torch.manual_seed(seed)
    vit = VisionTransformer(**{**SMALL, **kwargs})
    with torch.no_grad():  # non-trivial CLS and positions (timm starts CLS near zero)
        vit.cls_token.normal_()
        vit.pos_embed.normal_()
    return vit.eval()
