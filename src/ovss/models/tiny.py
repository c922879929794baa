"""Tiny random-weight models, built from configs in milliseconds, for smoke tests (`models="tiny"`).

They keep the *shapes that matter* of the real models, so methods run their real code paths: an SD-1.5-like
UNet with attention at four downsampling factors (1/2/4/8: 5/5/5/1 layers per attention type, faseg.md §7.1),
an 8x VAE, CLIP with 12 vision blocks (TagCLIP indexes blocks 8-11) and the real 49,408-token CLIP BPE
tokenizer, BLIP with a BERT WordPiece tokenizer (`[DEC]` as BOS), DINOv2 with patch 14, DINO with patch 8.
Every build is seeded under a forked RNG: the same weights every time, and the caller's RNG is untouched.
"""
from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from ovss.models.loading import (KINDS, BLIPModels, CLIPModels, Component, DiffusionModels, DINOModels, SAMModels,
                                 write_model_index)
from ovss.text.clip_bpe import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer

#: Seed of every tiny build (one fixed seed per kind; the kinds do not share weights anyway).
TINY_SEED = 0
#: SD-1.x latent scale (`vae.config.scaling_factor`).
SD_VAE_SCALE = 0.18215
#: CLIP's learned temperature is initialised (and, in the released weights, ends) at ln(100).
CLIP_LOGIT_SCALE = math.log(100.0)
#: SD-1.x DDIM schedule (faseg.md §2): scaled_linear betas 0.00085 -> 0.012 over 1000 steps.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@lru_cache(maxsize=1)
def blip_vocab() -> dict[str, int]:
    """The shipped WordPiece vocabulary: token -> id (its line number)."""
    text = (resources.files("ovss") / "assets" / "blip_vocab" / "vocab.txt").read_text(encoding="utf-8")
    return {tok: i for i, tok in enumerate(text.splitlines())}


def blip_tokenizer():
    """A BertTokenizer on the shipped vocabulary, with BLIP's `[DEC]` decoder BOS."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab=dict(blip_vocab()), bos_token="[DEC]")


def build_tiny(kind: str) -> Component:
    """A tiny `kind` component with deterministic random weights (fp32, CPU, eval mode)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        component = _BUILDERS[kind]()
    for module in vars(component).values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return component


def save_tiny(kind: str, directory: str | Path) -> Path:
    """Write a tiny `kind` model into `directory` in the hub's folder layout; returns the folder.

    diffusion: model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/ (like a StableDiffusionPipeline
    repo); others: the model's config + weights, plus tokenizer/processor files.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    c = build_tiny(kind)
    if isinstance(c, DiffusionModels):
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            getattr(c, name).save_pretrained(out / name)
        write_model_index(out)
    else:
        c.model.save_pretrained(out)
        extra = getattr(c, "processor", None) or getattr(c, "tokenizer", None)
        if extra is not None:
            extra.save_pretrained(out)
    return out


#: q/k weight gain of the tiny UNet. At the default init its attention is nearly uniform, so a method's per-class
#: min-max (FA-Seg, DiffSegmenter) divides by a range of ~1e-5 and amplifies float rounding ~10⁴-fold; a gain of 6
#: gives maps a 5-25 % relative range, closer to trained models, and makes batched vs single runs agree to ~1e-6.
TINY_QK_GAIN = 6.0


def _sharpen_attention(unet) -> None:
    with torch.no_grad():
        for module in unet.modules():
            if hasattr(module, "to_q") and hasattr(module, "to_k"):
                module.to_q.weight.mul_(TINY_QK_GAIN)
                module.to_k.weight.mul_(TINY_QK_GAIN)


def _tiny_diffusion() -> DiffusionModels:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # diffusers' legacy naming: `attention_head_dim` here is the number of heads (2), as SD-1.5's 8.
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    _sharpen_attention(unet)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=256, scaling_factor=SD_VAE_SCALE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID))
    return DiffusionModels(unet, vae, text_encoder, clip_tokenizer(), DDIMScheduler(**SD_SCHEDULER), "tiny")


def _tiny_clip() -> CLIPModels:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=EOS_ID),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=2,
                           patch_size=16, image_size=224),
        projection_dim=16, logit_scale_init_value=CLIP_LOGIT_SCALE)
    return CLIPModels(CLIPModel(config), clip_tokenizer(), "tiny")


def _tiny_blip() -> BLIPModels:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tokenizer = blip_tokenizer()
    vocab = blip_vocab()
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                         bos_token_id=vocab["[DEC]"], pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"],
                         eos_token_id=vocab["[SEP]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=384, patch_size=16),
        projection_dim=32)
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 384, "width": 384}),
                              tokenizer=tokenizer)
    return BLIPModels(BlipForConditionalGeneration(config), processor, "tiny")


def _tiny_dinov2() -> DINOModels:
    from transformers import Dinov2Config, Dinov2Model

    return DINOModels(Dinov2Model(Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=518)),
        "tiny")


def _tiny_dino() -> DINOModels:
    from transformers import ViTConfig, ViTModel

    return DINOModels(ViTModel(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
        image_size=224), add_pooling_layer=False), "tiny")


def _tiny_sam() -> SAMModels:
    from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

    side = 256
    config = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           mlp_dim=64, image_size=side, patch_size=16, window_size=4, global_attn_indexes=[1],
                           num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=side, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))
    processor = SamProcessor(image_processor=SamImageProcessorPil(
        size={"longest_edge": side}, pad_size={"height": side, "width": side}))
    return SAMModels(SamModel(config), processor, "tiny")


_BUILDERS = {"diffusion": _tiny_diffusion, "clip": _tiny_clip, "blip": _tiny_blip, "dinov2": _tiny_dinov2,
             "dino": _tiny_dino, "sam": _tiny_sam}
