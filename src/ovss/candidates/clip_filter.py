"""CLIP zero-shot class scores and the `blip_clip` category filter (diffsegmenter.md §3.5).

DiffSegmenter's filter was never released; the maintainers describe CLIP image–class similarity ≥ 0.97 and
CLIP caption–class text similarity ≥ 0.8. Raw CLIP cosines are ≈ 0.2–0.35, so the 0.97 can only be relative:
the project reads it as score / top score (top-1 always kept). No parity is claimed.

The text side here (prompt-ensembled class embeddings, cached per model) is shared with TagCLIP.
"""
from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ovss.models.devices import model_device_dtype

#: OpenAI's 80 ImageNet prompt templates in their canonical order (typos such as "a origami {}." included).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

#: OpenAI CLIP's normalisation constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: diffsegmenter.md §3.5: relative image-score threshold and caption–class text-similarity threshold.
IMAGE_REL_THRESHOLD = 0.97
TEXT_THRESHOLD = 0.8

_TEXT_CHUNK = 1024  # prompts per text-encoder call: bounds memory for 100+ classes × 85 templates
_text_cache: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def encode_texts(clip: Any, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised projected CLIP text embeddings (N, E) in float32.

    Padding is harmless: the text mask is causal and pooling happens at the first EOS.
    """
    model, tok = clip.model, clip.tokenizer
    device, _ = model_device_dtype(model)
    out = []
    for i in range(0, len(texts), _TEXT_CHUNK):
        enc = tok(list(texts[i:i + _TEXT_CHUNK]), padding=True, truncation=True, return_tensors="pt")
        pooled = model.text_model(input_ids=enc["input_ids"].to(device),
                                  attention_mask=enc["attention_mask"].to(device)).pooler_output
        out.append(F.normalize(model.text_projection(pooled).float(), dim=-1))
    if not out:
        return torch.zeros(0, model.text_projection.out_features, device=device)
    return torch.cat(out)


def templates_digest(templates: Sequence[str]) -> str:
    """sha256 of the templates joined by newlines (tagclip.md §3.1 uses it as the template-set id)."""
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()


def class_text_features(clip: Any, names: Sequence[str], templates: Sequence[str] = IMAGENET_TEMPLATES
                        ) -> torch.Tensor:
    """Prompt-ensembled class embeddings (K, E): normalise each prompt, average, normalise again.

    Cached per (model, names, template hash, device): TagCLIP's VOC vocabulary alone is 45 × 85 prompts.
    """
    device, dtype = model_device_dtype(clip.model)
    key = (tuple(names), templates_digest(templates), str(device), dtype)
    per_model = _text_cache.setdefault(clip.model, {})
    if key not in per_model:
        prompts = [t.replace("{}", n) for n in names for t in templates]
        feats = encode_texts(clip, prompts).view(len(names), len(templates), -1).mean(1)
        per_model[key] = F.normalize(feats, dim=-1)
    return per_model[key]


def clip_pixels(clip: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """CLIP's standard preprocessing (short side to the model's size, bicubic, centre crop, normalise)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = clip.model.config.vision_config.image_size
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]


@torch.no_grad()
def clip_image_class_scores(clip: Any, images: Sequence[Image.Image], vocabulary: Sequence[str],
                            templates: Sequence[str] = IMAGENET_TEMPLATES) -> torch.Tensor:
    """Cosine similarity (B, K) between each image and each class's template-averaged text embedding."""
    device, dtype = model_device_dtype(clip.model)
    text = class_text_features(clip, vocabulary, templates)
    if not images:
        return torch.zeros(0, len(vocabulary), device=device)
    pixels = clip_pixels(clip, images).to(device=device, dtype=dtype)
    img = clip.model.get_image_features(pixel_values=pixels).pooler_output
    return F.normalize(img.float(), dim=-1) @ text.T


def relative_keep(scores: torch.Tensor, rel_threshold: float = IMAGE_REL_THRESHOLD) -> torch.Tensor:
    """(B, K) bool: score / top score >= rel_threshold per row, the top class always kept.

    Written as score >= top - (1 - rel)·|top| so that a negative top score (possible with random weights)
    does not flip the inequality; for top > 0 it is exactly score / top >= rel.
    """
    if scores.shape[-1] == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    top = scores.max(dim=-1, keepdim=True).values
    keep = scores >= top - (1.0 - rel_threshold) * top.abs()
    keep[torch.arange(scores.shape[0]), scores.argmax(dim=-1)] = True
    return keep


@torch.no_grad()
def clip_filter(clip: Any, images: Sequence[Image.Image], vocabulary: Sequence[str], *,
                rel_threshold: float = IMAGE_REL_THRESHOLD, captions: Sequence[str] | None = None,
                text_threshold: float = TEXT_THRESHOLD, templates: Sequence[str] = IMAGENET_TEMPLATES
                ) -> list[list[str]]:
    """Per image, the vocabulary names (in vocabulary order) kept by the `blip_clip` rule.

    Image part: `relative_keep` of the image–class cosines. Caption part (when captions are given): classes
    whose template-averaged text embedding has cosine >= text_threshold with the caption's embedding.
    """
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    if not vocabulary:
        return [[] for _ in images]
    keep = relative_keep(clip_image_class_scores(clip, images, vocabulary, templates), rel_threshold)
    if captions is not None and len(images):
        text_sim = encode_texts(clip, captions) @ class_text_features(clip, vocabulary, templates).T
        keep |= text_sim >= text_threshold
    return [[name for name, k in zip(vocabulary, row.tolist()) if k] for row in keep]
