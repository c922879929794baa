"""The toy world's model architectures: small instances of the classes the papers use, built from configs.

Why these shapes: each keeps what a method reads. CLIP has 12 vision blocks (TagCLIP reads blocks 8-10 and
votes over all 12) and the real 49,408-token BPE vocabulary; the UNets have attention at four resolutions
like SD-1.5 (64-px images -> 16x16 latents -> attention grids 16/8/4/2), so per-resolution weights mean
something; BLIP decodes with a BERT WordPiece vocabulary whose first token is `[DEC]`.
Everything is sized to train on a 2-core CPU in about an hour and to ship in under 40 MB (fp16): the text
tower's 49,408 x 64 token table (6.3 MB) ships three times (clip/ and both diffusion folders), which is why the
UNets are narrower than SD's proportions would suggest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ovss.models.tiny import SD_SCHEDULER, blip_vocab
from ovss.text.clip_bpe import BOS_ID, EOS_ID, VOCAB_SIZE
from ovss.toy.scenes import TOY_CLASSES, TOY_COLORS, TOY_THINGS, plural

#: Side of every toy image, and the VAE's downsampling factor (3 levels) -> 16x16x4 latents.
TOY_IMAGE_SIZE = 64
TOY_VAE_FACTOR = 4
TOY_LATENT_SIZE = TOY_IMAGE_SIZE // TOY_VAE_FACTOR
#: CLIP's temperature initialisation, 1/0.07 (CLIP paper §2.5); learnable.
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


@dataclass(frozen=True)
class ClipSpec:
    vision_width: int = 96
    vision_layers: int = 12
    vision_heads: int = 4
    patch: int = 8
    text_width: int = 64
    text_layers: int = 4
    text_heads: int = 4
    projection: int = 64


@dataclass(frozen=True)
class UNetSpec:
    channels: tuple[int, ...] = (32, 64, 64, 64)
    layers_per_block: int = 1
    heads: int = 4
    cross_dim: int = 64  # = the CLIP text width


@dataclass(frozen=True)
class VaeSpec:
    channels: tuple[int, ...] = (32, 32, 64)
    latent_channels: int = 4


@dataclass(frozen=True)
class DinoSpec:
    width: int = 96
    layers: int = 6
    heads: int = 4
    patch: int = 8  # 64 px -> an 8x8 token grid (patch 4 cost 5 s/step on the shared 2-core CPU)
    mlp_ratio: int = 2


@dataclass(frozen=True)
class BlipSpec:
    width: int = 96
    vision_layers: int = 4
    text_layers: int = 3
    heads: int = 4
    patch: int = 8


def build_clip(spec: ClipSpec = ClipSpec()):
    """A CLIPModel for 64-px images (8x8 patch grid) with the real CLIP vocabulary and special ids."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=spec.text_width, intermediate_size=4 * spec.text_width,
                         num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                         max_position_embeddings=77, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID),
        vision_config=dict(hidden_size=spec.vision_width, intermediate_size=2 * spec.vision_width,
                           num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                           patch_size=spec.patch, image_size=TOY_IMAGE_SIZE),
        projection_dim=spec.projection, logit_scale_init_value=CLIP_INIT_LOGIT_SCALE)
    return CLIPModel(config)


def build_vae(spec: VaeSpec = VaeSpec(), scaling_factor: float = 1.0):
    """AutoencoderKL 64 px -> 16x16x4 (3 levels: factor 4); `scaling_factor` is measured after training."""
    from diffusers import AutoencoderKL

    n = len(spec.channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec.latent_channels, block_out_channels=spec.channels,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=16, sample_size=TOY_IMAGE_SIZE, scaling_factor=scaling_factor)


def build_unet(spec: UNetSpec = UNetSpec()):
    """SD-1.5-shaped UNet on 16x16 latents: 3 cross-attention down blocks + a plain one, a cross-attention mid
    block, mirrored up blocks -> cross and self attention at downsampling factors 1/2/4/8 (grids 16/8/4/2)."""
    from diffusers import UNet2DConditionModel

    n = len(spec.channels)
    # diffusers' legacy naming: `attention_head_dim` is the number of heads here, as in SD-1.5's config.
    return UNet2DConditionModel(
        sample_size=TOY_LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=spec.channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=spec.cross_dim, attention_head_dim=spec.heads, norm_num_groups=32)


def build_dinov2(spec: DinoSpec = DinoSpec()):
    """A Dinov2Model for 64-px images, patch 8 (8x8 tokens, like the toy CLIP); FreeDA pools its patch tokens."""
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(hidden_size=spec.width, num_hidden_layers=spec.layers,
                                    num_attention_heads=spec.heads, mlp_ratio=spec.mlp_ratio, patch_size=spec.patch,
                                    image_size=TOY_IMAGE_SIZE))


def dinov2_to_vit(dinov2):
    """The same network as a ViTModel (DINO v1's class, OVDiff's "dino" role): LayerScale folded into the
    output projections, LayerNorm names mapped. Outputs match at the training size (tested)."""
    import torch
    from transformers import ViTConfig, ViTModel

    c = dinov2.config
    vit = ViTModel(ViTConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                             num_attention_heads=c.num_attention_heads,
                             intermediate_size=int(c.hidden_size * c.mlp_ratio), patch_size=c.patch_size,
                             image_size=c.image_size, layer_norm_eps=c.layer_norm_eps, qkv_bias=c.qkv_bias),
                   add_pooling_layer=False)
    src = {k: v.float() for k, v in dinov2.state_dict().items()}
    out = {k: src[k] for k in ("embeddings.cls_token", "embeddings.position_embeddings",
                               "embeddings.patch_embeddings.projection.weight",
                               "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias")}
    for i in range(c.num_hidden_layers):
        a, b = f"encoder.layer.{i}.", f"layers.{i}."
        s1, s2 = src[a + "layer_scale1.lambda1"], src[a + "layer_scale2.lambda1"]
        for proj in ("q_proj", "k_proj", "v_proj"):
            for t in ("weight", "bias"):
                out[f"{b}attention.{proj}.{t}"] = src[f"{a}attention.{proj}.{t}"]
        out[b + "attention.o_proj.weight"] = src[a + "attention.o_proj.weight"] * s1[:, None]
        out[b + "attention.o_proj.bias"] = src[a + "attention.o_proj.bias"] * s1
        out[b + "mlp.fc1.weight"], out[b + "mlp.fc1.bias"] = src[a + "mlp.fc1.weight"], src[a + "mlp.fc1.bias"]
        out[b + "mlp.fc2.weight"] = src[a + "mlp.fc2.weight"] * s2[:, None]
        out[b + "mlp.fc2.bias"] = src[a + "mlp.fc2.bias"] * s2
        for n_src, n_dst in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            for t in ("weight", "bias"):
                out[f"{b}{n_dst}.{t}"] = src[f"{a}{n_src}.{t}"]
    with torch.no_grad():
        vit.load_state_dict(out)
    return vit.eval()


def build_scheduler():
    """SD-1.x's DDIM schedule (scaled_linear 0.00085-0.012, 1000 steps), as the ε UNet was trained with."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULER)


def toy_blip_vocab() -> dict[str, int]:
    """The shipped WordPiece vocabulary plus every toy caption word it lacks, appended in a fixed order.

    Appended after every shipped id, so shipped ids keep their meaning; without them BLIP would spell "heart"
    or "triangles" piece by piece."""
    vocab = dict(blip_vocab())
    words = [*TOY_CLASSES, *(plural(t) for t in TOY_THINGS), *TOY_COLORS,
             "brick", "before", "toy", "photograph"]
    for w in words:
        if w not in vocab:
            vocab[w] = len(vocab)
    return vocab


def toy_blip_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab=toy_blip_vocab(), bos_token="[DEC]")


def build_blip(spec: BlipSpec = BlipSpec()):
    """BlipForConditionalGeneration for 64-px images (8x8 patches) and the toy WordPiece vocabulary."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    vocab = toy_blip_vocab()
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=spec.width, encoder_hidden_size=spec.width,
                         intermediate_size=2 * spec.width, num_hidden_layers=spec.text_layers,
                         num_attention_heads=spec.heads, max_position_embeddings=64, bos_token_id=vocab["[DEC]"],
                         pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"]),
        vision_config=dict(hidden_size=spec.width, intermediate_size=2 * spec.width,
                           num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
                           image_size=TOY_IMAGE_SIZE, patch_size=spec.patch),
        projection_dim=spec.width)
    return BlipForConditionalGeneration(config)


def blip_processor():
    """The BLIP processor at 64 px (PIL image processor: torchvision's resize differs)."""
    from transformers import BlipImageProcessorPil, BlipProcessor

    size = {"height": TOY_IMAGE_SIZE, "width": TOY_IMAGE_SIZE}
    return BlipProcessor(image_processor=BlipImageProcessorPil(size=size), tokenizer=toy_blip_tokenizer())


def clip_image_processor():
    """CLIP's preprocessing at 64 px with OpenAI's mean/std (what `clip_pixels` and TagCLIP apply)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ovss.candidates.clip_filter import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessorPil(size={"shortest_edge": TOY_IMAGE_SIZE},
                                 crop_size={"height": TOY_IMAGE_SIZE, "width": TOY_IMAGE_SIZE},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
