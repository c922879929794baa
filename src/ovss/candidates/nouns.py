"""Vocabulary names mentioned in a caption (the "BLIP nouns" half of FA-Seg's and DiffSegmenter's candidates).

Pure string matching, no POS tagger: none is available offline, and the candidates only need the
vocabulary's own names (faseg.md §3.3: "dataset names found in the BLIP caption").
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_WORD_CHAR = r"[^\W_]"  # letters and digits: a name must not sit inside a longer word


def _plural_forms(word: str) -> str:
    """Regex alternation for a word and its simple plurals (s, es, consonant-y -> ies)."""
    forms = [re.escape(word) + "(?:e?s)?"]
    if len(word) > 1 and word[-1].lower() == "y" and word[-2].lower() not in "aeiou":
        forms.append(re.escape(word[:-1]) + "ies")
    return "|".join(forms)


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    """Case-insensitive whole-word pattern; words may be separated by spaces or hyphens; last word may be plural."""
    words = phrase.split()
    body = r"[\s\-]+".join([re.escape(w) for w in words[:-1]] + [f"(?:{_plural_forms(words[-1])})"])
    return re.compile(rf"(?<!{_WORD_CHAR})(?:{body})(?!{_WORD_CHAR})", re.IGNORECASE)


def names_in_caption(caption: str, vocabulary: Sequence[str],
                     synonyms: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """Names of `vocabulary` mentioned in `caption`, in vocabulary order.

    Longest match first: overlapping mentions go to the longer phrase, so "dining table" claims the words
    and "table" is not also reported. `synonyms` maps a vocabulary name to extra phrases that count as it.
    """
    phrases = [(name, name) for name in vocabulary]
    for name, alts in (synonyms or {}).items():
        if name in vocabulary:
            phrases += [(alt, name) for alt in alts]
    spans = []
    for phrase, name in phrases:
        if not phrase.split():
            continue
        spans += [(m.start(), m.end(), name) for m in _phrase_pattern(phrase).finditer(caption)]
    spans.sort(key=lambda s: (s[0] - s[1], s[0]))  # longest first, then leftmost
    taken: list[tuple[int, int]] = []
    found = set()
    for start, end, name in spans:
        if all(end <= a or start >= b for a, b in taken):
            taken.append((start, end))
            found.add(name)
    return [name for name in vocabulary if name in found]
