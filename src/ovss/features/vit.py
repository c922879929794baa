"""Patch tokens and attention keys of vision transformers (DINO, DINOv2, CLIP's vision tower)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ovss.attention.maps import tokens_to_grid
from ovss.models.devices import model_device_dtype

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(pixels: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> per-channel standardised, on the pixels' device."""
    m = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - m) / s


@torch.no_grad()
def dinov2_patch_tokens(dino: Any, pixels: torch.Tensor, size: int) -> torch.Tensor:
    """DINOv2 patch tokens (B, g, g, D) float32 of images (B, 3, H, W) in [0, 1]: squashed to size² (bilinear,
    align_corners=False), ImageNet-normalised, final-LayerNorm tokens without CLS (FreeDA's features)."""
    model = dino.model
    device, dtype = model_device_dtype(model)
    x = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False)
    x = normalise(x).to(device=device, dtype=dtype)
    tokens = model(pixel_values=x).last_hidden_state[:, 1:].float()
    g = size // model.config.patch_size
    return tokens.reshape(x.shape[0], g, g, -1)


def _hooked_output(module: torch.nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """Run `run()` and return what `module` produced during it."""
    got: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: got.append(o))
    try:
        run()
    finally:
        handle.remove()
    if len(got) != 1:
        raise RuntimeError(f"expected one call of the hooked module, saw {len(got)}")
    return got[0]


def _last_key_projection(model: torch.nn.Module) -> torch.nn.Module:
    last = model.config.num_hidden_layers - 1
    for name in (f"layers.{last}.attention.k_proj", f"encoder.layer.{last}.attention.attention.key"):
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    raise RuntimeError(f"cannot find the key projection of the last block of {type(model).__name__}")


def _key_grid(keys: torch.Tensor, pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """Keys (B, 1 + h·w, D) with CLS first -> (B, D, h, w) float32."""
    return tokens_to_grid(keys[:, 1:].float(), (pixels.shape[-2] // patch, pixels.shape[-1] // patch))


@torch.no_grad()
def vit_keys(vit: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Keys of the last block of a DINO / DINOv2 ViT, W_k·LN1(x) + b_k, heads concatenated, CLS dropped:
    (B, D, H/p, W/p) float32 (ImageNet-normalised input at its own size, position embeddings interpolated)."""
    model = vit.model
    device, dtype = model_device_dtype(model)
    x = normalise(pixels.to(device=device, dtype=torch.float32)).to(dtype)
    keys = _hooked_output(_last_key_projection(model), lambda: model(pixel_values=x, interpolate_pos_encoding=True))
    return _key_grid(keys, pixels, model.config.patch_size)


@torch.no_grad()
def clip_keys(clip: Any, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """Keys of CLIP vision block `layer` (ImageNet statistics, as OVDiff's official code), CLS dropped:
    (B, D, H/p, W/p) float32."""
    vision = clip.model.vision_model
    device, dtype = model_device_dtype(vision)
    x = normalise(pixels.to(device=device, dtype=torch.float32)).to(dtype)
    module = vision.encoder.layers[layer].self_attn.k_proj
    keys = _hooked_output(module, lambda: vision(pixel_values=x, interpolate_pos_encoding=True))
    return _key_grid(keys, pixels, clip.model.config.vision_config.patch_size)
