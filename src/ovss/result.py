"""The value every method returns: a label map at the input's size plus the scores behind it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Segmentation:
    """labels: (H, W) int array indexing `classes`; scores: (len(classes), H, W) float32.

    `classes[0]` is "background" when background handling was on. `meta` carries what produced the
    result (method, caption, candidate classes, threshold, ...) and is written to the JSON summary.
    """

    labels: np.ndarray
    scores: np.ndarray
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labels.ndim != 2:
            raise ValueError(f"labels must be (H, W), got {self.labels.shape}")
        if self.scores.shape != (len(self.classes), *self.labels.shape):
            raise ValueError(
                f"scores {self.scores.shape} do not match {len(self.classes)} classes at {self.labels.shape}"
            )

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
