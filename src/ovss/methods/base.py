"""What every method shares: construction from a models preset, class checks, batching, OOM fallback.

A method subclass supplies a `Config` dataclass, the model roles it reads, and `_segment_batch`, which
turns a list of RGB images plus one request into Segmentations. Everything around that lives here.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from PIL import Image

from ovss.dense.labels import labels_with_background, labels_without_background
from ovss.io import ImageInput, load_image
from ovss.models import ModelSet, resolve_device, resolve_dtype
from ovss.result import Segmentation
from ovss.text.classes import BACKGROUND, validate_classes

log = logging.getLogger(__name__)


@dataclass
class SegmentRequest:
    """One call's class vocabulary and per-image side information.

    given: per-image class lists (e.g. ground-truth image labels or a candidates file); each must be a
    subset of `classes`. captions: per-image captions that replace the method's captioner.
    """

    classes: list[str]
    background: bool = True
    bg_threshold: float | None = None
    given: list[list[str]] | None = None
    captions: list[str] | None = None

    @property
    def output_classes(self) -> list[str]:
        """A result's classes: "background" first when background is on, then the vocabulary."""
        return ([BACKGROUND] if self.background else []) + self.classes

    def threshold(self, configured: float) -> float:
        """τ of this call: the caller's `bg_threshold`, else the method's configured one."""
        return float(configured if self.bg_threshold is None else self.bg_threshold)

    def candidate_scores(self, candidates: Sequence[str], maps: torch.Tensor | None, tau: float,
                         size_hw: tuple[int, int]) -> torch.Tensor:
        """(len(output_classes), h, w): the candidates' maps in their channels, τ in the background channel
        (what the background rule compared against), 0 for classes that were not scored."""
        out = torch.zeros(len(self.output_classes), *size_hw)
        if self.background:
            out[0] = tau
        if candidates:
            out[self._positions(candidates)] = maps
        return out

    def candidate_labels(self, scores: torch.Tensor, candidates: Sequence[str], tau: float,
                         ties: Literal["class", "background"]) -> torch.Tensor:
        """Labels indexing output_classes from the candidates' (K, H, W) scores: the background rule at τ when
        background is on (`ties` as labels_with_background), else the best candidate."""
        index = self._positions(candidates)
        if self.background:
            return torch.cat([index.new_zeros(1), index])[labels_with_background(scores, tau, ties=ties)]
        return index[labels_without_background(scores)]

    def _positions(self, names: Sequence[str]) -> torch.Tensor:
        offset = 1 if self.background else 0
        return torch.tensor([offset + self.classes.index(n) for n in names], dtype=torch.long)

    def subset(self, idx: Sequence[int]) -> "SegmentRequest":
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return SegmentRequest(self.classes, self.background, self.bg_threshold, pick(self.given), pick(self.captions))


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Method:
    """Base class of the registered methods. Subclasses set `Config`, `roles`, `_segment_batch`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    #: model roles this method may read, e.g. ("diffusion", "captioner", "tagger")
    roles: ClassVar[tuple[str, ...]] = ()
    #: dtype used on CUDA when the caller does not choose one (the dtype behind the paper's numbers)
    cuda_dtype: ClassVar[str] = "float16"
    default_batch_size: ClassVar[int] = 1
    #: evaluation protocol behind the paper's numbers (`ovss eval` default): "candidates", "tcl", "ovdiff", ...
    paper_protocol: ClassVar[str | None] = None
    #: True: segment() applies its paper protocol's resize and windows itself (OVDiff), so `ovss eval` passes it
    #: the original image under that protocol instead of a pre-resized one
    own_geometry: ClassVar[bool] = False
    #: class-name spellings the paper used (a key of ovss.data.names.NAME_SETS), when it differs from the dataset's
    name_set: ClassVar[str | None] = None

    def __init__(self, config: Any, models: None | str | dict[str, str] = None, *, device: str | None = None,
                 dtype: str | None = None) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, cuda_default=self.cuda_dtype)
        self.models = ModelSet(self.name, models, device=self.device, dtype=self.dtype)
        for role in self.required_roles():
            self.models[role]  # load now: a missing model fails at create(), not mid-run

    # -- to override -------------------------------------------------------------------------------
    def required_roles(self) -> tuple[str, ...]:
        """Roles this configuration needs (others load lazily if a call asks for them)."""
        return self.roles

    def _segment_batch(self, images: list[Image.Image], request: SegmentRequest) -> list[Segmentation]:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------------
    def segment(self, image: ImageInput, classes: Iterable[str] | str, *, background: bool = True,
                bg_threshold: float | None = None, given: list[str] | None = None,
                caption: str | None = None) -> Segmentation:
        """Segment one image over `classes` (any list of names)."""
        return next(iter(self.segment_many(
            [image], classes, batch_size=1, background=background, bg_threshold=bg_threshold,
            given=None if given is None else [given], captions=None if caption is None else [caption])))

    def segment_many(self, images: Iterable[ImageInput], classes: Iterable[str] | str, *,
                     batch_size: int | None = None, background: bool = True, bg_threshold: float | None = None,
                     given: Sequence[list[str]] | None = None, captions: Sequence[str] | None = None,
                     ) -> Iterator[Segmentation]:
        """Yield one Segmentation per image, in order, running `batch_size` images per model call.

        On a GPU out-of-memory error the batch is halved and retried, down to one image.
        """
        vocab = validate_classes(classes)
        bs = max(1, batch_size or self.default_batch_size)
        request = SegmentRequest(vocab, background, bg_threshold,
                                 None if given is None else [self._check_given(g, vocab) for g in given],
                                 None if captions is None else list(captions))
        buf: list[Image.Image] = []
        start = 0
        for i, img in enumerate(images):
            buf.append(load_image(img))
            if len(buf) == bs:
                yield from self._run_with_fallback(buf, request, start)
                start = i + 1
                buf = []
        if buf:
            yield from self._run_with_fallback(buf, request, start)

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _check_given(names: Sequence[str], vocab: list[str]) -> list[str]:
        unknown = [n for n in names if n not in vocab]
        if unknown:
            raise ValueError(f"given classes {unknown} are not in the class list {vocab}")
        return list(names)

    def _run_with_fallback(self, images: list[Image.Image], request: SegmentRequest, start: int
                           ) -> list[Segmentation]:
        """Segment images[k] = the request's image start + k; halve the batch on out-of-memory."""
        try:
            return self._segment_batch(images, request.subset(range(start, start + len(images))))
        except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err) or len(images) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(images) // 2
            log.warning("out of memory at batch %d; retrying with batches of %d", len(images), half)
            return (self._run_with_fallback(images[:half], request, start)
                    + self._run_with_fallback(images[half:], request, start + half))
