"""Prompt encoding for the diffusion text encoder (CLIP ViT-L/14 in SD-1.x)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int = 77) -> torch.Tensor:
    """Pad to `max_length` with the pad id (EOS for CLIP) and truncate, warning when a prompt is cut.

    One tokenizer call: a prompt that does not fit spills into overflow rows (`overflow_to_sample_mapping`),
    which is how a cut is seen; its first row is the truncated prompt.
    """
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt",
                    return_overflowing_tokens=True)
    owner = enc["overflow_to_sample_mapping"].tolist()
    for i, p in enumerate(prompts):
        if owner.count(i) > 1:
            log.warning("prompt longer than %d tokens, truncated: %r", max_length, p[:120])
    return enc.input_ids[[owner.index(i) for i in range(len(prompts))]]


@torch.no_grad()
def encode_prompts(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, 77) token ids -> (B, 77, D) last hidden state: what the UNet cross-attends to."""
    return text_encoder(input_ids.to(text_encoder.device))[0]
