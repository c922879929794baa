"""Compel-style prompt weighting ("cat++"), reimplemented natively with compel 2.0.2's semantics.

DiffSegmenter's "[class]++" emphasis is compel's word weighting: a word marked `word++` weighs 1.1² = 1.21,
and its sub-token rows of the text embedding become z′ = z∅ + w·(z − z∅), where z∅ is the encoding of the
empty prompt ("" -> BOS, EOS, then pad ids) at the same position. Every other row is the plain encoding.
The anchor is z∅, not zero, which is why the pad id of the model's own tokenizer matters
(diffsegmenter.md §3.2 step 3d, trap 8).

Syntax (the subset of compel's that DiffSegmenter uses): `word+…` (each "+" multiplies the weight by 1.1; the
word is the run of characters before the "+" up to whitespace or one of `()",.=`, so "cat++," weighs "cat")
and `(words)W` / `(words)++` for a group. Weights below 1 are refused: compel implements them by blending
with a prompt that lacks the words, a different operation. As in compel, the marked and unmarked pieces
are tokenised separately and concatenated.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ovss.diffusion.text import encode_prompts, tokenize_prompts

log = logging.getLogger(__name__)

#: compel: each "+" multiplies a word's weight by 1.1 ("cat++" -> 1.21).
PLUS_STEP = 1.1

_WORD = r"[^\s()\",.+=]+"
_MARK = re.compile(rf"\(([^()]+)\)(\++|\d+(?:\.\d+)?)|({_WORD})(\++)")


@dataclass(frozen=True)
class WeightedPrompt:
    """A weighted prompt, tokenised: what `encode_weighted` feeds to the text encoder.

    text: the prompt with the marks removed; input_ids: BOS, content, EOS, pad ids (max_length);
    token_weights: one weight per position (1 outside marked words); n_content: tokens between BOS and EOS.
    """

    text: str
    input_ids: tuple[int, ...]
    token_weights: tuple[float, ...]
    n_content: int


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """Split a marked prompt into (text, weight) pieces; joined, the texts give the unmarked prompt.

    "a photograph of cat++ on a couch" -> [("a photograph of ", 1.0), ("cat", 1.21), (" on a couch", 1.0)].
    """
    pieces: list[tuple[str, float]] = []
    pos = 0
    for m in _MARK.finditer(prompt):
        group, group_weight, word, plus = m.groups()
        pieces += [(prompt[pos:m.start()], 1.0)] if m.start() > pos else []
        pieces.append((group, _weight(group_weight)) if group is not None else (word, _weight(plus)))
        pos = m.end()
    return pieces + ([(prompt[pos:], 1.0)] if pos < len(prompt) else [])


def _weight(mark: str) -> float:
    return PLUS_STEP ** len(mark) if mark.startswith("+") else _supported(float(mark))


def _supported(weight: float) -> float:
    if weight < 1:
        raise ValueError(f"prompt weight {weight} < 1 is not supported (compel blends such words away instead)")
    return weight


def weight_mark(word: str, weight: float) -> str:
    """The compel mark of one word: "cat" (weight 1), "cat++" (1.1²), "(cat)1.5" (any other weight ≥ 1)."""
    if _supported(weight) == 1:
        return word
    n = round(math.log(weight) / math.log(PLUS_STEP))
    if n >= 1 and math.isclose(weight, PLUS_STEP**n, rel_tol=1e-9):
        return word + "+" * n
    return f"({word}){float(weight)!r}"


def weigh_tokens(tokenizer, prompt: str, max_length: int = 77) -> WeightedPrompt:
    """Tokenise a marked prompt piece by piece (compel's way): BOS, content, EOS, padded with the pad id.

    Content beyond `max_length - 2` tokens is cut, with a warning.
    """
    pieces = parse_weights(prompt)
    content: list[int] = []
    weights: list[float] = []
    for text, weight in pieces:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []
        content += ids
        weights += [weight] * len(ids)
    text = "".join(t for t, _ in pieces)
    budget = max_length - 2
    if len(content) > budget:
        log.warning("prompt truncated from %d to %d tokens: %r", len(content) + 2, max_length, text[:120])
        content, weights = content[:budget], weights[:budget]
    ids = [tokenizer.bos_token_id, *content, tokenizer.eos_token_id]
    pad = max_length - len(ids)
    return WeightedPrompt(text, tuple(ids + [tokenizer.pad_token_id] * pad), tuple([1.0, *weights] + [1.0] * (pad + 1)),
                          len(content))


def apply_weights(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z′ = z∅ + w·(z − z∅) on rows with w ≠ 1; other rows are z itself, bit for bit (compel computes the
    formula everywhere, equal up to rounding).

    z: (B, T, D); z_empty: (1 or B, T, D); weights: (B, T).
    """
    w = weights.to(device=z.device, dtype=z.dtype)[..., None]
    return torch.where(w != 1, z_empty + w * (z - z_empty), z)


@torch.no_grad()
def encode_weighted(text_encoder, tokenizer, prompts: Sequence[str | WeightedPrompt], max_length: int = 77
                    ) -> torch.Tensor:
    """(B, max_length, D) weighted text embeddings of marked prompts ("a photograph of cat++ on a couch")."""
    wps = [p if isinstance(p, WeightedPrompt) else weigh_tokens(tokenizer, p, max_length) for p in prompts]
    z = encode_prompts(text_encoder, torch.tensor([p.input_ids for p in wps]))
    weights = torch.tensor([p.token_weights for p in wps])
    if bool((weights == 1).all()):
        return z
    z_empty = encode_prompts(text_encoder, tokenize_prompts(tokenizer, [""], max_length))
    return apply_weights(z, z_empty, weights)
