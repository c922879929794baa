"""BLIP captioning, batched over images.

FA-Seg uses unconditional captions (its P_t); DiffSegmenter completes a per-class prefix ("a photograph of
cat" -> "a photograph of cat sitting on a couch"). Both papers ran the transformers defaults of their day
(greedy, max_length 20 counting the prompt tokens), so those are pinned here instead of being inherited from
whatever generation config a checkpoint ships.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ovss.models.devices import model_device_dtype

#: transformers' generation defaults that the papers' captions were produced with (diffsegmenter.md §2).
BLIP_MAX_LENGTH = 20


def _generation_kwargs(max_length: int, num_beams: int) -> dict[str, Any]:
    # max_new_tokens=None so that a checkpoint's generation config cannot override max_length.
    return dict(do_sample=False, num_beams=num_beams, num_return_sequences=1, max_length=max_length,
                max_new_tokens=None, min_length=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                length_penalty=1.0, early_stopping=False)


@torch.no_grad()
def caption_images(blip: Any, images: Sequence[Image.Image], prompts: Sequence[str] | None = None, *,
                   max_length: int = BLIP_MAX_LENGTH, num_beams: int = 1) -> list[str]:
    """One caption per image, greedy by default; conditional on `prompts[i]` when prompts are given.

    Unconditional captions run as one `generate` call. Conditional prompts are grouped by token length and
    each group runs as one call: BLIP drops the prompt's last token ([SEP]) by position and pads nowhere, so
    mixing lengths in one call would leave [SEP]/[PAD] inside shorter prompts and change their captions.
    """
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    if not images:
        return []
    model, processor = blip.model, blip.processor
    device, dtype = model_device_dtype(model)
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    pixels = pixels.to(device=device, dtype=dtype)
    gen = _generation_kwargs(max_length, num_beams)
    if prompts is None:
        return _decode(processor, model.generate(pixel_values=pixels, **gen))
    token_ids = [processor.tokenizer(p)["input_ids"] for p in prompts]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(token_ids):
        groups[len(ids)].append(i)
    captions = [""] * len(images)
    for idx in groups.values():
        input_ids = torch.tensor([token_ids[i] for i in idx], device=device)
        out = model.generate(pixel_values=pixels[idx], input_ids=input_ids,
                             attention_mask=torch.ones_like(input_ids), **gen)
        for i, text in zip(idx, _decode(processor, out)):
            captions[i] = text
    return captions


def _decode(processor: Any, output_ids: torch.Tensor) -> list[str]:
    return [t.strip() for t in processor.batch_decode(output_ids, skip_special_tokens=True)]
