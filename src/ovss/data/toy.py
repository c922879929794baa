"""The toy benchmark: scenes from the procedural toy world (ovss.toy) served as a dataset, no files needed.

Two readings of the same scenes, like VOC21/VOC20 for real data:
- `toy`: background + things (label 0 = every stuff pixel), background scored — the VOC / COCO-Object sense;
- `toy_full`: stuff + things, no background, nothing ignored — the COCO-Stuff sense.

A split is the first `limit` scenes (default TOY_DEFAULT_IMAGES) of the toy world's seed range for that split,
generated on the fly at `size`; the ids carry the split and the seed, so a cached prediction always names the
scene it belongs to.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from ovss.data.datasets import Sample, SegDataset
from ovss.toy import MIN_SIDE, TOY_CLASSES, TOY_THINGS_WITH_BG, Scene, make_scene, split_seeds

#: scenes per split when no limit is given: enough for stable toy numbers, seconds to generate at 64 px
TOY_DEFAULT_IMAGES = 100
TOY_DEFAULT_SIZE = 64
TOY_SPLITS = ("val", "test")


@lru_cache(maxsize=32)
def _scene(seed: int, size: int) -> Scene:
    """Image and labels are read separately (possibly from loader threads): generate each scene once."""
    return make_scene(seed, size)


class ToyDataset(SegDataset):
    """`toy`: background (all stuff) + the toy things; ids are "<split>_<seed>"."""

    key: ClassVar[str] = "toy"
    default_split: ClassVar[str] = "val"
    has_background: ClassVar[bool] = True
    names: ClassVar[tuple[str, ...]] = TOY_THINGS_WITH_BG

    def __init__(self, root: str | Path | None = None, split: str | None = None, *, limit: int | None = None,
                 class_names: list[str] | None = None, size: int = TOY_DEFAULT_SIZE) -> None:
        split = split or self.default_split
        if split not in TOY_SPLITS:
            raise ValueError(f"{self.key}: unknown split {split!r}; the toy benchmark has {', '.join(TOY_SPLITS)}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if class_names is not None:
            class_names = list(class_names)
            if len(class_names) != len(self.names) or len(set(class_names)) != len(class_names):
                raise ValueError(f"{self.key}: class_names must be {len(self.names)} distinct names, got {class_names}")
        if size < MIN_SIDE:  # refused here, not in a loader thread mid-run
            raise ValueError(f"{self.key}: size must be at least {MIN_SIDE}, got {size}")
        self.root = None if root is None else Path(root)
        self.split = split
        self.size = int(size)
        self.class_names = class_names if class_names is not None else list(self.names)
        virtual = Path("toy") / split
        self.samples = [Sample(f"{split}_{seed}", virtual / f"{seed}.jpg", virtual / f"{seed}.png")
                        for seed in split_seeds(split)[: limit or TOY_DEFAULT_IMAGES]]

    @staticmethod
    def seed_of(sample: Sample) -> int:
        return int(sample.id.rsplit("_", 1)[1])

    def load_image(self, sample: Sample) -> Image.Image:
        return _scene(self.seed_of(sample), self.size).image

    def load_label(self, sample: Sample) -> np.ndarray:
        return _scene(self.seed_of(sample), self.size).labels_things.astype(np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, split={self.split!r}, n={len(self)}, size={self.size})"


class ToyFullDataset(ToyDataset):
    """`toy_full`: stuff + things named, no background."""

    key = "toy_full"
    has_background = False
    names = TOY_CLASSES

    def load_label(self, sample: Sample) -> np.ndarray:
        return _scene(self.seed_of(sample), self.size).labels_full.astype(np.int64)


TOY_DATASETS: dict[str, type[ToyDataset]] = {cls.key: cls for cls in (ToyDataset, ToyFullDataset)}
