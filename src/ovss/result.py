"""The value every method returns: a label map at the input's size plus the scores behind it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovss.dense.labels import resize_scores


@dataclass
class Segmentation:
    """labels: (H, W) int array indexing `classes`, at the input image's size.

    `scores` is (len(classes), H, W) float32. It is stored at the method's working resolution
    (`scores_lowres`, e.g. 512² for FA-Seg) and upsampled bilinearly on access, so a huge image with many
    classes costs memory only when a caller asks for full-size scores. `classes[0]` is "background" when
    background handling was on (its channel holds the threshold the rule compared against). `meta` records
    what produced the result (method, caption, candidates, threshold) and goes into the JSON summary.
    """

    labels: np.ndarray
    scores_lowres: np.ndarray
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labels.ndim != 2:
            raise ValueError(f"labels must be (H, W), got {self.labels.shape}")
        if self.scores_lowres.ndim != 3 or self.scores_lowres.shape[0] != len(self.classes):
            raise ValueError(f"scores {self.scores_lowres.shape} do not match {len(self.classes)} classes")

    @property
    def scores(self) -> np.ndarray:
        """(len(classes), H, W) float32 at the image's size (computed on access; not cached)."""
        return resize_scores(torch.from_numpy(self.scores_lowres), self.labels.shape).numpy()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), PIL order."""
        return self.labels.shape[1], self.labels.shape[0]

    def fractions(self) -> dict[str, float]:
        """Fraction of pixels per class present in the label map."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.classes))
        total = self.labels.size
        return {c: float(n) / total for c, n in zip(self.classes, counts) if n > 0}

    def mask(self, name: str) -> np.ndarray:
        """Binary mask of one class."""
        return self.labels == self.classes.index(name)

    def save(self, out_dir: str | Path, stem: str = "segmentation", *, image=None, masks: bool = False) -> dict[str, Path]:
        """Write label PNG, overlay (if `image` given), JSON summary and optional per-class masks."""
        from ovss.io import save_segmentation

        return save_segmentation(self, Path(out_dir), stem, image=image, masks=masks)
