"""Full-size random-weight diffusion models (`models="random"`), for timing and memory only.

No real checkpoint can be downloaded here, yet speed and memory depend only on the architecture: these are the
published SD-1.5 configurations (UNet 859.5 M parameters, VAE 83.7 M, CLIP ViT-L/14 text encoder 123.1 M, the
real CLIP BPE tokenizer and the pipeline's DDIM scheduler), so a benchmark on them costs what one on
InstaFlow's 2-RF or SD-1.5 would. The modules are built on the `meta` device (no memory, no init) and then
materialised once, in the target dtype and on the target device, with a cheap seeded init that keeps the
activations in range (PyTorch's default Linear/Conv bounds, unit norms, CLIP's 0.02 embeddings).
"""
from __future__ import annotations

import math

import torch

from ovss.models.devices import resolve_device, resolve_dtype
from ovss.models.loading import DiffusionModels
from ovss.models.tiny import SD_SCHEDULER, SD_VAE_SCALE
from ovss.text.clip_bpe import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer

#: Seed of the random full-size weights.
RANDOM_SEED = 0
#: CLIP's `initializer_range` for token and position embeddings.
CLIP_EMBED_STD = 0.02

#: SD-1.5 UNet (`unet/config.json` of stable-diffusion-v1-5 and of InstaFlow's 2-RF); diffusers' legacy naming:
#: `attention_head_dim=8` is the number of heads.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
#: SD-1.5 VAE (`vae/config.json`).
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
                scaling_factor=SD_VAE_SCALE)
#: CLIP ViT-L/14 text tower (`text_encoder/config.json`).
SD15_TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
#: Parameter counts of the three modules, as published (and checked by the tests on the meta device).
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def build_random_full(device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None,
                      seed: int = RANDOM_SEED) -> DiffusionModels:
    """SD-1.5-sized UNet + VAE + text encoder with seeded random weights, eval mode, gradients off.

    device="meta" returns the modules without allocating any weight (for parameter counts and shapes).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    meta = torch.device(device).type == "meta" if device is not None else False
    dev = torch.device("meta") if meta else resolve_device(device)
    dt = resolve_dtype(dtype, torch.device("cpu") if meta else dev)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    modules = (unet, vae, text_encoder)
    for module in modules:
        # The base-class cast: diffusers' own `to` warns about fp32-only modules, which SD-1.5 does not have.
        torch.nn.Module.to(module, dtype=dt).eval().requires_grad_(False)
    if not meta:
        generator = torch.Generator(dev).manual_seed(seed)
        for module in modules:
            _materialise(module, dev, generator)
    return DiffusionModels(unet, vae, text_encoder, clip_tokenizer(), DDIMScheduler(**SD_SCHEDULER), "random")


@torch.no_grad()
def _materialise(model: torch.nn.Module, device: torch.device, generator: torch.Generator) -> None:
    """Allocate `model`'s meta tensors on `device` and fill them (in place, in their own dtype)."""
    model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            bound = 1 / math.sqrt(module.weight[0].numel())  # PyTorch's default: U(±1/√fan_in)
            module.weight.uniform_(-bound, bound, generator=generator)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if module.weight is not None:
                module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0.0, CLIP_EMBED_STD, generator=generator)
        elif any(True for _ in module.parameters(recurse=False)):
            raise TypeError(f"random_full: no init rule for {type(module).__name__}")
    for name, buffer in model.named_buffers():
        if not name.endswith("position_ids"):  # to_empty left it uninitialised: only known buffers may exist
            raise TypeError(f"random_full: no init rule for buffer {name}")
        buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
