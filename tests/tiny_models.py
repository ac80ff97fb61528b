"""Tiny random-weight ViTs shared by the timm / open_clip tests (built from configs, no download)."""

import open_clip
import timm


def tiny_vit(**overrides):
    """A timm VisionTransformer: 32 px, patch 8 (4x4 grid), width 64, 4 heads, depth 2; overrides win."""
    cfg = dict(pretrained=False, num_classes=5, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    cfg.update(overrides)
    return timm.create_model("vit_small_patch16_224", **cfg).eval()


#: The ViT variants every ViT method is tested on; each value takes overrides for ``tiny_vit``.
VIT_VARIANTS = {
    "plain": {},
    "layerscale_qknorm_registers": dict(init_values=1e-2, qk_norm=True, reg_tokens=4),
    "dynamic_size": dict(dynamic_img_size=True),
    "no_class_token_avg_pool": dict(class_token=False, global_pool="avg"),
}


def tiny_clip(layers: int = 2):
    """An open_clip CLIP whose visual tower is a 32 px ViT (patch 8, width 64, 4 heads of 16)."""
    vision = dict(image_size=32, layers=layers, width=64, patch_size=8, head_width=16, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
