"""The pluggable candidate-class stage: per image, which vocabulary names a method scores.

Candidate lists bound the quality of DiffSegmenter and FA-Seg (a missing class can never be predicted), so the
source is a named, swappable choice: `get_selector("tagclip_blip")` is FA-Seg's default, `"blip_clip"`
DiffSegmenter's approximation, `"given"` the caller's lists (ground truth or a shipped file), `"all"` none.
Results keep the vocabulary's order; an empty list is valid (the method returns all background).
Selectors that read a CLIP model take `clip_role` (default "tagger", "filter" for `blip_clip`), so a method
whose model set names its CLIP role differently can still use them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from PIL import Image

from ovss.candidates.captioning import BLIP_MAX_LENGTH, caption_images
from ovss.candidates.clip_filter import IMAGE_REL_THRESHOLD, TEXT_THRESHOLD, clip_filter
from ovss.candidates.nouns import names_in_caption
from ovss.candidates.tagclip import tag_many


class CandidateSelector(Protocol):
    roles: tuple[str, ...]  # model roles it reads ("captioner", "tagger", "filter")

    def __call__(self, images: list[Image.Image], vocabulary: list[str], *, models: Any,
                 captions: list[str] | None = None, given: list[list[str]] | None = None) -> list[list[str]]:
        ...


def _ordered(names: Iterable[str], vocabulary: Sequence[str]) -> list[str]:
    chosen = set(names)
    return [v for v in vocabulary if v in chosen]


def _check_count(what: str, items: Sequence[Any], images: Sequence[Any]) -> None:
    if len(items) != len(images):
        raise ValueError(f"{len(items)} {what} for {len(images)} images")


def _captions(images: Sequence[Image.Image], captions: Sequence[str] | None, models: Any, max_length: int,
              num_beams: int) -> list[str]:
    """The caller's captions when given (e.g. shipped caption files), else BLIP captions of the images."""
    if captions is not None:
        _check_count("captions", captions, images)
        return list(captions)
    return caption_images(models["captioner"], list(images), max_length=max_length, num_beams=num_beams)


@dataclass(frozen=True)
class AllSelector:
    """Every vocabulary name for every image (no candidate stage)."""

    roles: ClassVar[tuple[str, ...]] = ()

    def __call__(self, images: list[Image.Image], vocabulary: list[str], *, models: Any = None,
                 captions: list[str] | None = None, given: list[list[str]] | None = None) -> list[list[str]]:
        return [list(vocabulary) for _ in images]


@dataclass(frozen=True)
class GivenSelector:
    """The caller's per-image lists (ground-truth labels, or an official candidates file), re-ordered."""

    roles: ClassVar[tuple[str, ...]] = ()

    def __call__(self, images: list[Image.Image], vocabulary: list[str], *, models: Any = None,
                 captions: list[str] | None = None, given: list[list[str]] | None = None) -> list[list[str]]:
        if given is None:
            raise ValueError('candidate selector "given" needs per-image class lists (given=...)')
        _check_count("given lists", given, images)
        unknown = sorted({n for g in given for n in g} - set(vocabulary))
        if unknown:
            raise ValueError(f"given classes {unknown} are not in the vocabulary {list(vocabulary)}")
        return [_ordered(g, vocabulary) for g in given]


@dataclass(frozen=True)
class BlipNounsSelector:
    """Vocabulary names mentioned in each image's caption (BLIP's when no captions are given)."""

    synonyms: Mapping[str, Sequence[str]] | None = None
    max_length: int = BLIP_MAX_LENGTH
    num_beams: int = 1
    roles: ClassVar[tuple[str, ...]] = ("captioner",)

    def __call__(self, images: list[Image.Image], vocabulary: list[str], *, models: Any = None,
                 captions: list[str] | None = None, given: list[list[str]] | None = None) -> list[list[str]]:
        caps = _captions(images, captions, models, self.max_length, self.num_beams)
        return [names_in_caption(c, vocabulary, self.synonyms) for c in caps]


class _OneClipRole:
    """Selectors that read one CLIP model, from the role their `clip_role` field names."""

    clip_role: str

    @property
    def roles(self) -> tuple[str, ...]:
        return (self.clip_role,)


@dataclass(frozen=True)
class ClipSelector(_OneClipRole):
    """CLIP image–class scores relative to the top score (the `blip_clip` rule without its caption part)."""

    rel_threshold: float = IMAGE_REL_THRESHOLD
    clip_role: str = "tagger"

    def __call__(self, images: list[Image.Image], vocabulary: list[str], *, models: Any = None,
                 captions: list[str] | None = None, given: list[list[str]] | None = None) -> list[list[str]]:
        return clip_filter(models[self.clip_role], list(images), list(vocabulary), rel_threshold=self.rel_threshold)


@dataclass(frozen=True)
class BlipClipSelector:
    """DiffSegmenter's category filter, approximated (diffsegmenter.md §3.5): relative CLIP image scores ∪
    classes whose text embedding is close to the caption's."""

    rel_threshold: float = IMAGE_REL_THRESHOLD
    text_threshold: float = TEXT_THRESHOLD
    max_length: int = BLIP_MAX_LENGTH
    num_beams: int = 1
    clip_role: str = "filter"

    @property
    def roles(self) -> tuple[str, ...]:
        return ("captioner", self.clip_role)

    def __call__(self, images: list[Image.Image], vocabulary: list[str], *, models: Any = None,
                 captions: list[str] | None = None, given: list[list[str]] | None = None) -> list[list[str]]:
        caps = _captions(images, captions, models, self.max_length, self.num_beams)
        return clip_filter(models[self.clip_role], list(images), list(vocabulary), rel_threshold=self.rel_threshold,
                           captions=caps, text_threshold=self.text_threshold)


@dataclass(frozen=True)
class TagCLIPSelector(_OneClipRole):
    """TagCLIP tags (tagclip.md). `aliases` maps display names to prompt spellings (e.g. "dining table" ->
    "diningtable"), which the published tags were produced with; results use the display names."""

    preset: str = "default"
    background: Sequence[str] | str = "auto"
    aliases: Mapping[str, str] | None = None
    official_quirks: bool = True
    max_tokens: int | None = None
    clip_role: str = "tagger"

    def __call__(self, images: list[Image.Image], vocabulary: list[str], *, models: Any = None,
                 captions: list[str] | None = None, given: list[list[str]] | None = None) -> list[list[str]]:
        prompt_names = [(self.aliases or {}).get(v, v) for v in vocabulary]
        tags = tag_many(models[self.clip_role], list(images), prompt_names, self.background, preset=self.preset,
                        official_quirks=self.official_quirks, max_tokens=self.max_tokens)
        return [[vocabulary[i] for i in t] for t in tags]


@dataclass(frozen=True)
class TagCLIPBlipSelector(TagCLIPSelector):
    """FA-Seg's default (faseg.md §3.3): TagCLIP tags ∪ vocabulary names found in the caption."""

    synonyms: Mapping[str, Sequence[str]] | None = None
    max_length: int = BLIP_MAX_LENGTH
    num_beams: int = 1

    @property
    def roles(self) -> tuple[str, ...]:
        return (self.clip_role, "captioner")

    def __call__(self, images: list[Image.Image], vocabulary: list[str], *, models: Any = None,
                 captions: list[str] | None = None, given: list[list[str]] | None = None) -> list[list[str]]:
        caps = _captions(images, captions, models, self.max_length, self.num_beams)
        tagged = super().__call__(images, vocabulary, models=models)
        return [_ordered([*t, *names_in_caption(c, vocabulary, self.synonyms)], vocabulary)
                for t, c in zip(tagged, caps)]


_SELECTORS: dict[str, type] = {
    "all": AllSelector,
    "given": GivenSelector,
    "blip_nouns": BlipNounsSelector,
    "clip": ClipSelector,
    "blip_clip": BlipClipSelector,
    "tagclip": TagCLIPSelector,
    "tagclip_blip": TagCLIPBlipSelector,
}


def list_selectors() -> list[str]:
    """Names accepted by `get_selector`, sorted."""
    return sorted(_SELECTORS)


def get_selector(name: str, **options: Any) -> CandidateSelector:
    """Build a selector by name; `options` set its fields (e.g. preset="coco_stuff", rel_threshold=0.9)."""
    try:
        cls = _SELECTORS[name]
    except KeyError:
        raise ValueError(f"unknown candidate selector {name!r}; valid: {', '.join(list_selectors())}") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"candidate selector {name!r}: unknown option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(sorted(fields)) or 'none'}")
    return cls(**options)
