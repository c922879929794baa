"""The evaluation protocols as data (evaluation.md table, §2–§6).

The same benchmark name means different numbers under different protocols, so a result is only
meaningful with its protocol; every field here is something that changes the number. Method-specific
parts (normalisation statistics, thresholds, background rule) stay with the methods.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from ovss.data.names import DATASET_CLASSES
from ovss.dense.windows import (
    Window,
    resize_image,
    resize_short_side,
    resize_short_side_truncate,
    window_set,
)

ResizeRule = Literal["mmcv_bilinear", "pil_lanczos", "squash512_by_method"]


@dataclass(frozen=True)
class Protocol:
    """Geometry, vocabulary and mean of one protocol (for one dataset, where they vary per dataset).

    resize: "mmcv_bilinear" = mmcv keep-ratio size rule (long side capped at `long_cap`) + bilinear;
    "pil_lanczos" = torchvision short-side rule (truncated long side) + PIL LANCZOS (OVDiff's evaluator);
    "squash512_by_method" = the whole original image goes to the method, which squashes it to 512x512
    with its own interpolation (DiffSegmenter: bilinear tensor, FA-Seg: PIL bicubic) — no window.
    extra_windows: further square crop sizes at the same stride; whole_image adds the full image as one
    more window (OVDiff). mean: "nan" = mmseg nanmean, "plain" = absent classes count 0.
    """

    name: str
    short_side: int | None
    crop: int | None
    stride: int | None
    resize: ResizeRule
    mean: Literal["nan", "plain"]
    extra_windows: tuple[int, ...] = ()
    whole_image: bool = False
    long_cap: int = 2048
    vocabulary: Literal["full", "candidates"] = "full"
    datasets: tuple[str, ...] | None = None  # None = every benchmark
    description: str = ""

    @property
    def sliding(self) -> bool:
        return self.crop is not None

    def scaled_size(self, size_wh: tuple[int, int]) -> tuple[int, int]:
        """(w, h) the image is resized to before windowing."""
        if self.resize == "mmcv_bilinear":
            return resize_short_side(size_wh, self.short_side, self.long_cap)
        if self.resize == "pil_lanczos":
            return resize_short_side_truncate(size_wh, self.short_side)
        return tuple(size_wh)

    def prepare(self, image: Image.Image) -> Image.Image:
        """The image the windows are cut from (unchanged for "squash512_by_method")."""
        if self.resize == "squash512_by_method":
            return image
        return resize_image(image, self.scaled_size(image.size), self.resize)

    def windows(self, h: int, w: int) -> list[Window]:
        """Windows (y1, y2, x1, x2) on the prepared image; one whole-image window without sliding."""
        if not self.sliding:
            return [(0, h, 0, w)]
        return window_set(h, w, (self.crop, *self.extra_windows), self.stride, self.whole_image)

    def to_dict(self) -> dict[str, Any]:
        """For the protocol tag stored with every result."""
        return dataclasses.asdict(self)


CANDIDATE_DATASETS = ("voc21", "context60", "coco_object")

# `sclip`: short side 336 except COCO-Stuff 448 and Cityscapes 560 (trap 10).
SCLIP_SHORT_SIDE = {"coco_stuff": 448, "cityscapes": 560}
SCLIP_DEFAULT_SHORT_SIDE = 336

PROTOCOLS: dict[str, Protocol] = {
    "tcl": Protocol(
        "tcl", short_side=448, crop=448, stride=224, resize="mmcv_bilinear", mean="nan",
        description="mmseg 0.27: short side 448, slide 448/224, full class list, nanmean",
    ),
    "candidates": Protocol(
        "candidates", short_side=None, crop=None, stride=None, resize="squash512_by_method", mean="plain",
        vocabulary="candidates", datasets=CANDIDATE_DATASETS,
        description="diffusion candidate-list protocol: whole image squashed to 512x512 by the method, "
                    "per-image candidate lists, plain mean",
    ),
    "sclip": Protocol(
        "sclip", short_side=SCLIP_DEFAULT_SHORT_SIDE, crop=224, stride=112, resize="mmcv_bilinear", mean="nan",
        description="mmseg 1.x SCLIP family: short side 336 (COCO-Stuff 448, Cityscapes 560), slide 224/112",
    ),
    "ovdiff": Protocol(
        "ovdiff", short_side=448, crop=448, stride=224, resize="pil_lanczos", mean="nan",
        extra_windows=(336,), whole_image=True,
        description="OVDiff's evaluator: LANCZOS short side 448, windows 448 and 336 at stride 224 + whole image",
    ),
}


def get_protocol(name: str, dataset_key: str) -> Protocol:
    """The protocol as it applies to one dataset (per-dataset sizes resolved, unsupported pairs refused)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; available: {', '.join(PROTOCOLS)}")
    if dataset_key not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset {dataset_key!r}; available: {', '.join(DATASET_CLASSES)}")
    proto = PROTOCOLS[name]
    if proto.datasets is not None and dataset_key not in proto.datasets:
        raise ValueError(
            f"protocol {name!r} is defined only for {', '.join(proto.datasets)} (background always scored); "
            f"got {dataset_key!r}"
        )
    if name == "sclip":
        proto = dataclasses.replace(proto, short_side=SCLIP_SHORT_SIDE.get(dataset_key, SCLIP_DEFAULT_SHORT_SIDE))
    return proto
