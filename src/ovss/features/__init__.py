"""Dense features of frozen backbones, from images (B, 3, H, W) in [0, 1]: DINOv2 patch tokens (FreeDA's
prototypes and bank), the keys of a ViT's or CLIP's attention and a diffusion UNet's cross-attention queries
(OVDiff's three extractors). The methods choose layers and sizes; these only read the models."""
from ovss.features.unet import unet_queries
from ovss.features.vit import IMAGENET_MEAN, IMAGENET_STD, clip_keys, dinov2_patch_tokens, normalise, vit_keys

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "clip_keys", "dinov2_patch_tokens", "normalise", "unet_queries",
           "vit_keys"]
