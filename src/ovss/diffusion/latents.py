"""Images to latents, and the single-step noise updates the methods apply to them.

Both diffusion methods read attention off a UNet pass on a *real* image's latent, so these steps decide
what the attention sees. Seeding is per image (not per batch) so that a result never depends on which
other images shared its batch.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def pil_to_tensor(images: Sequence[Image.Image], size: int, resample: int = Image.BICUBIC) -> torch.Tensor:
    """Squash each RGB image to size×size with PIL (antialiased) -> (B, 3, size, size) float in [0, 1]."""
    arrs = [np.asarray(im.convert("RGB").resize((size, size), resample), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def tensor_resize(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Each RGB image as [0, 1] floats at its own size, then a torch bilinear resize (align_corners=False, no
    antialias) to size×size -> (B, 3, size, size). DiffSegmenter resizes this way, not with PIL's antialiased
    bicubic (diffsegmenter.md §3.2 step 1)."""
    out = []
    for im in images:
        arr = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append(F.interpolate(arr[None], size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


def seeded_noise(shape: Sequence[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """N(0, I) from a CPU generator re-seeded to `seed`: identical on every device and batch layout."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=dtype)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, scale: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """pixels (N, 3, H, W) in [0, 1] -> scale · VAE posterior sample, (N, C, h, w).

    noise: the N(0, I) draw of the posterior sample (callers seed it per image with `seeded_noise`, as the
    official code re-seeds per image); None takes the posterior mean (a documented deviation).
    """
    dist = vae.encode((pixels * 2 - 1).to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.mean if noise is None else dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)
    return z * scale


def ddim_inversion_step(z: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """One deterministic DDIM update from ᾱ_from to ᾱ_to given the predicted noise ε̂:
    z' = √ᾱ_to · (z − √(1−ᾱ_from)·ε̂)/√ᾱ_from + √(1−ᾱ_to)·ε̂."""
    x0 = (z - (1 - alpha_from) ** 0.5 * eps) / alpha_from**0.5
    return alpha_to**0.5 * x0 + (1 - alpha_to) ** 0.5 * eps


def add_noise(z0: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Forward diffusion to a timestep with cumulative ᾱ: √ᾱ·z₀ + √(1−ᾱ)·ε (DiffSegmenter's t = 100)."""
    return alpha**0.5 * z0 + (1 - alpha) ** 0.5 * eps
