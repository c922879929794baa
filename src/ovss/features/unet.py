"""Dense features of a diffusion UNet read on a real image: its cross-attention queries at one timestep."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ovss.attention import attention_layers
from ovss.attention.maps import tokens_to_grid
from ovss.diffusion.latents import add_noise, encode_latents, seeded_noise
from ovss.diffusion.text import encode_prompts, tokenize_prompts


@torch.no_grad()
def unet_queries(dm: Any, pixels: torch.Tensor, *, layers: Sequence[str], timestep: int,
                 noise_seed: int | None) -> torch.Tensor:
    """`to_q` outputs of the named blocks' first attn2 for one UNet pass at `timestep` with the empty prompt and
    no CFG, upsampled bilinearly to the latent grid and concatenated in `layers` order: (B, ΣC, h, w) float32.

    The VAE posterior sample and the DDPM noise use the same normal tensor (OVDiff's official code draws both
    from generators seeded alike); here it is `seeded_noise(noise_seed)` for every image (order-independent),
    or the global RNG when noise_seed is None.
    """
    unet, vae = dm.unet, dm.vae
    b = pixels.shape[0]
    f = dm.vae_factor
    shape = (unet.config.in_channels, pixels.shape[-2] // f, pixels.shape[-1] // f)
    noise = (seeded_noise((1, *shape), noise_seed, torch.float32).expand(b, *shape) if noise_seed is not None
             else torch.randn((b, *shape)))
    z0 = encode_latents(vae, pixels, dm.vae_scale, noise=noise)
    zt = add_noise(z0, noise.to(device=z0.device, dtype=z0.dtype), float(dm.scheduler.alphas_cumprod[timestep]))
    empty = encode_prompts(dm.text_encoder, tokenize_prompts(dm.tokenizer, [""])).expand(b, -1, -1).to(unet.dtype)
    factors = attention_layers(unet)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for layer in layers:
            name = f"{layer}.transformer_blocks.0.attn2"
            if f"{name}.processor" not in factors:
                raise ValueError(f"sd_layers: the UNet has no {name}")
            handles.append(unet.get_submodule(f"{name}.to_q").register_forward_hook(
                lambda m, i, o, key=layer: captured.__setitem__(key, o)))
        unet(zt.to(unet.dtype), timestep, encoder_hidden_states=empty)
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer in layers:
        fac = factors[f"{layer}.transformer_blocks.0.attn2.processor"][1]
        grid = tokens_to_grid(captured[layer].float(), (math.ceil(shape[1] / fac), math.ceil(shape[2] / fac)))
        if tuple(grid.shape[-2:]) != shape[1:]:
            grid = F.interpolate(grid, size=shape[1:], mode="bilinear", align_corners=False)
        out.append(grid)
    return torch.cat(out, 1)
