"""Readers for the eight benchmarks in their standard (mmseg `data/`) layouts (evaluation.md §1.1).

Each reader lists (image, label) pairs of one split and turns a label file into the integer map the
metric scores: conversions that the converters would have written (COCO raw -> train ids, COCO-Object,
Cityscapes labelIds) are applied on the fly when the converted file is absent, then reduce-zero-label
where the benchmark uses it. A folder that does not match fails with the expected layout spelled out,
and a missing label file fails instead of being skipped (the original evaluators skip silently).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from ovss.data import names as N

IGNORE_INDEX = 255

# COCO-Stuff raw ids (= COCO category id - 1) that never occur (evaluation.md §1.1).
COCO_UNUSED_RAW_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_USED_RAW_IDS: tuple[int, ...] = tuple(i for i in range(182) if i not in COCO_UNUSED_RAW_IDS)
COCO_THING_RAW_IDS: tuple[int, ...] = tuple(i for i in COCO_USED_RAW_IDS if i <= 90)

# Cityscapes labelId -> trainId (the shipped *_gtFine_labelIds.png); everything else -> 255.
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def _lut(mapping: dict[int, int], default: int) -> np.ndarray:
    lut = np.full(256, default, dtype=np.int64)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


COCO_STUFF_LUT = _lut({raw: rank for rank, raw in enumerate(COCO_USED_RAW_IDS)}, IGNORE_INDEX)
# TCL/GroupViT converter: things -> train id + 1, every other raw id (stuff, unlabeled 255) -> 0.
COCO_OBJECT_LUT = _lut({raw: rank + 1 for rank, raw in enumerate(COCO_THING_RAW_IDS)}, 0)
CITYSCAPES_LUT = _lut(CITYSCAPES_LABEL_TO_TRAIN, IGNORE_INDEX)


def apply_lut(label: np.ndarray, lut: np.ndarray, what: str) -> np.ndarray:
    if label.size and (label.min() < 0 or label.max() >= len(lut)):
        raise ValueError(f"{what}: values outside 0..{len(lut) - 1} ({label.min()}..{label.max()})")
    return lut[label.astype(np.int64)]


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg semantics: 0 -> 255 (ignored), every other label - 1, 255 stays 255."""
    label = label.astype(np.int64)
    out = label - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out


def read_label_png(path: Path) -> np.ndarray:
    """Label indices as stored: no mode conversion, which would turn a palette PNG into colours (trap 8)."""
    with Image.open(path) as im:
        arr = np.array(im)
    if arr.ndim != 2:
        raise ValueError(
            f"{path}: label image has shape {arr.shape} (mode {im.mode}); expected one channel of class "
            "indices (palette or grayscale PNG). A palette PNG converted to RGB has lost its indices."
        )
    return arr


@dataclass(frozen=True)
class Sample:
    id: str
    image_path: Path
    label_path: Path


class LayoutError(FileNotFoundError):
    """The data root does not hold the expected on-disk layout."""


@dataclass(frozen=True)
class _Layout:
    """Where a benchmark lives below the data root: candidate base folders and required entries."""

    title: str
    bases: tuple[str, ...]          # tried in order, relative to the root ("." = the root itself)
    required: tuple[str, ...]       # relative to the base; "{split}" is filled in
    pattern: tuple[str, ...]        # the layout as shown to the user, relative to the first base
    hint: str = ""


class SegDataset:
    """One split of one benchmark: a list of Samples plus the label semantics the metric needs."""

    key: ClassVar[str]
    layout: ClassVar[_Layout]
    default_split: ClassVar[str] = "val"
    has_background: ClassVar[bool] = False
    reduce_zero_label: ClassVar[bool] = False
    ignore_index: ClassVar[int] = IGNORE_INDEX

    def __init__(self, root: str | Path, split: str | None = None, *, limit: int | None = None,
                 class_names: list[str] | None = None) -> None:
        self.root = Path(root)
        self.split = self._split_dir(split or self.default_split)
        default = list(N.DATASET_CLASSES[self.key])
        if class_names is not None:
            class_names = list(class_names)
            if len(class_names) != len(default):
                raise ValueError(f"{self.key}: {len(class_names)} class names given, the labels have {len(default)}")
            if len(set(class_names)) != len(class_names):
                raise ValueError(f"{self.key}: duplicate names in class_names")
        self.class_names: list[str] = class_names if class_names is not None else default
        self.base = self._find_base()
        samples = self._list_samples(self.base)
        if not samples:
            raise LayoutError(f"{self.key}: no images found for split {self.split!r} under {self.base}")
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            samples = samples[:limit]
        self._check_files(samples)
        self.samples: list[Sample] = samples

    # -- layout ------------------------------------------------------------------------------------
    def _split_dir(self, split: str) -> str:
        """The folder/file name of a split ("val" -> "val2017" for COCO, ...)."""
        return split

    def _find_base(self) -> Path:
        lay = self.layout
        required = [r.format(split=self.split) for r in lay.required]
        best: tuple[int, Path, list[str]] | None = None
        for rel in lay.bases:
            base = (self.root / rel) if rel != "." else self.root
            missing = [r for r in required if not (base / r).exists()]
            if not missing:
                return base
            found = len(required) - len(missing)
            if best is None or found > best[0]:
                best = (found, base, missing)
        assert best is not None
        _, base, missing = best
        expected = "\n".join(f"  {p.format(split=self.split)}" for p in lay.pattern)
        looked = ", ".join(str((self.root / b) if b != "." else self.root) for b in lay.bases)
        msg = (
            f"{self.key}: {self.root} does not hold the {lay.title} layout for split {self.split!r}.\n"
            f"Expected (relative to the data root):\n{expected}\n"
            f"Missing under {base}: {', '.join(missing)}\n(looked in: {looked})"
        )
        if lay.hint:
            msg += f"\n{lay.hint}"
        raise LayoutError(msg)

    def _list_samples(self, base: Path) -> list[Sample]:
        raise NotImplementedError

    def _check_files(self, samples: list[Sample]) -> None:
        missing = [p for s in samples for p in (s.image_path, s.label_path) if not p.is_file()]
        if missing:
            shown = "\n".join(f"  {p}" for p in missing[:5])
            raise LayoutError(
                f"{self.key}: {len(missing)} image/label file(s) of split {self.split!r} are missing, e.g.\n{shown}"
            )

    # -- access ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def load_image(self, sample: Sample) -> Image.Image:
        """RGB image as stored (no EXIF rotation: the labels are aligned with the stored pixels)."""
        with Image.open(sample.image_path) as im:
            return im.convert("RGB")

    def load_label(self, sample: Sample) -> np.ndarray:
        """(H, W) int64 labels in 0..num_classes-1 plus `ignore_index`, ready for the metric."""
        label = self._convert(read_label_png(sample.label_path), sample.label_path)
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        return label.astype(np.int64)

    def _convert(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return raw

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, split={self.split!r}, n={len(self)}, root={str(self.root)!r})"


class _SplitFileDataset(SegDataset):
    """VOC-style: ids listed in a split file, one image and one label file per id."""

    images: ClassVar[str] = "JPEGImages"
    labels: ClassVar[str]
    split_file: ClassVar[str]

    def _list_samples(self, base: Path) -> list[Sample]:
        ids = [ln.strip() for ln in (base / self.split_file.format(split=self.split)).read_text().splitlines()]
        return [Sample(i, base / self.images / f"{i}.jpg", base / self.labels / f"{i}.png") for i in ids if i]


_VOC_LAYOUT = _Layout(
    "PASCAL VOC 2012",
    ("VOCdevkit/VOC2012", "VOC2012", "."),
    ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/{split}.txt"),
    ("VOCdevkit/VOC2012/JPEGImages/*.jpg", "VOCdevkit/VOC2012/SegmentationClass/*.png",
     "VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt"),
    "Extract VOCtrainval_11-May-2012.tar into the data root.",
)


class VOC20(_SplitFileDataset):
    """VOC without background: label 0 and the 255 borders are ignored (reduce-zero-label)."""

    key = "voc20"
    layout = _VOC_LAYOUT
    labels = "SegmentationClass"
    split_file = "ImageSets/Segmentation/{split}.txt"
    reduce_zero_label = True


class VOC21(VOC20):
    key = "voc21"
    has_background = True
    reduce_zero_label = False


_CONTEXT_LAYOUT = _Layout(
    "PASCAL Context (converted)",
    ("VOCdevkit/VOC2010", "VOC2010", "."),
    ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/{split}.txt"),
    ("VOCdevkit/VOC2010/JPEGImages/*.jpg", "VOCdevkit/VOC2010/SegmentationClassContext/*.png",
     "VOCdevkit/VOC2010/ImageSets/SegmentationContext/{split}.txt"),
    "SegmentationClassContext/ is written by mmseg's tools/convert_datasets/pascal_context.py from "
    "trainval_merged.json (0 = background, 1..59 alphabetical); some repositories ship the converted PNGs.",
)


class Context59(_SplitFileDataset):
    """Converted PASCAL Context: 0 = background (ignored here via reduce-zero-label), 1..59 alphabetical."""

    key = "context59"
    layout = _CONTEXT_LAYOUT
    labels = "SegmentationClassContext"
    split_file = "ImageSets/SegmentationContext/{split}.txt"
    reduce_zero_label = True


class Context60(Context59):
    key = "context60"
    has_background = True
    reduce_zero_label = False


_COCO_LAYOUT = _Layout(
    "COCO-Stuff-164k",
    ("coco_stuff164k", "."),
    ("images/{split}", "annotations/{split}"),
    ("coco_stuff164k/images/{split}/*.jpg", "coco_stuff164k/annotations/{split}/*.png (raw stuffthingmaps) "
     "or *_labelTrainIds.png / *_instanceTrainIds.png (converted)"),
    "Unzip val2017.zip into images/ and stuffthingmaps_trainval2017.zip into annotations/.",
)


class COCOStuff(SegDataset):
    """COCO-Stuff 171: the converted *_labelTrainIds.png, or the raw map through the 171-id table."""

    key = "coco_stuff"
    layout = _COCO_LAYOUT
    converted_suffix: ClassVar[str] = "_labelTrainIds.png"
    raw_lut: ClassVar[np.ndarray] = COCO_STUFF_LUT

    def _split_dir(self, split: str) -> str:
        return split if split.endswith("2017") else f"{split}2017"

    def _list_samples(self, base: Path) -> list[Sample]:
        ann = base / "annotations" / self.split
        out = []
        for img in sorted((base / "images" / self.split).glob("*.jpg")):
            converted = ann / f"{img.stem}{self.converted_suffix}"
            out.append(Sample(img.stem, img, converted if converted.is_file() else ann / f"{img.stem}.png"))
        return out

    def _convert(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if path.name.endswith(self.converted_suffix):
            return raw
        return apply_lut(raw, self.raw_lut, str(path))


class COCOObject(COCOStuff):
    """COCO-Object (TCL/GroupViT rule): things -> 1..80, stuff and unlabeled -> 0 background; nothing ignored."""

    key = "coco_object"
    has_background = True
    converted_suffix = "_instanceTrainIds.png"
    raw_lut = COCO_OBJECT_LUT


_CITYSCAPES_LAYOUT = _Layout(
    "Cityscapes",
    ("cityscapes", "."),
    ("leftImg8bit/{split}", "gtFine/{split}"),
    ("cityscapes/leftImg8bit/{split}/<city>/*_leftImg8bit.png",
     "cityscapes/gtFine/{split}/<city>/*_gtFine_labelTrainIds.png (or the shipped *_gtFine_labelIds.png)"),
    "Unzip leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into cityscapes/.",
)


class Cityscapes(SegDataset):
    """Cityscapes 19: *_gtFine_labelTrainIds.png, else the shipped labelIds through the trainId lookup."""

    key = "cityscapes"
    layout = _CITYSCAPES_LAYOUT

    def _list_samples(self, base: Path) -> list[Sample]:
        out = []
        for img in sorted((base / "leftImg8bit" / self.split).glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            gt = base / "gtFine" / self.split / img.parent.name
            train_ids = gt / f"{stem}_gtFine_labelTrainIds.png"
            out.append(Sample(stem, img, train_ids if train_ids.is_file() else gt / f"{stem}_gtFine_labelIds.png"))
        return out

    def _convert(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if path.name.endswith("_gtFine_labelIds.png"):
            return apply_lut(raw, CITYSCAPES_LUT, str(path))
        return raw


_ADE_LAYOUT = _Layout(
    "ADE20K (SceneParsing 150)",
    ("ADEChallengeData2016", "."),
    ("images/{split}", "annotations/{split}"),
    ("ADEChallengeData2016/images/{split}/*.jpg", "ADEChallengeData2016/annotations/{split}/*.png"),
    "Unzip ADEChallengeData2016.zip into the data root.",
)


class ADE20K(SegDataset):
    """ADE20K-150: 0 = "other" (ignored via reduce-zero-label), 1..150."""

    key = "ade20k"
    layout = _ADE_LAYOUT
    default_split = "validation"
    reduce_zero_label = True

    def _split_dir(self, split: str) -> str:
        return {"val": "validation", "train": "training"}.get(split, split)

    def _list_samples(self, base: Path) -> list[Sample]:
        ann = base / "annotations" / self.split
        return [Sample(p.stem, p, ann / f"{p.stem}.png") for p in sorted((base / "images" / self.split).glob("*.jpg"))]


DATASETS: dict[str, type[SegDataset]] = {
    cls.key: cls for cls in (VOC20, VOC21, Context59, Context60, COCOObject, COCOStuff, Cityscapes, ADE20K)
}


def list_datasets() -> list[str]:
    return list(DATASETS)


def get_dataset(key: str, root: str | Path | None, split: str | None = None, *, limit: int | None = None,
                class_names: list[str] | None = None) -> SegDataset:
    """Open one split of a benchmark under a data root (the folder holding VOCdevkit/, coco_stuff164k/, ...).

    split defaults to the evaluation split ("val"; "validation" for ADE20K). limit keeps the first N
    samples in split order. class_names replaces the names (same count, same label order), e.g. a
    named alternative set from `ovss.data.names`.
    """
    known = {**DATASETS, **TOY_DATASETS}
    if key not in known:
        raise ValueError(f"unknown dataset {key!r}; available: {', '.join(known)}")
    return known[key](root, split, limit=limit, class_names=class_names)


# The generated toy benchmarks (root=None); imported last because they subclass SegDataset.
from ovss.data.toy import TOY_DATASETS  # noqa: E402
