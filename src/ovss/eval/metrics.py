"""Segmentation metrics with mmseg semantics (evaluation.md §5).

One integer confusion matrix per dataset, accumulated over all images; IoU per class from the
accumulated counts. Averaging per-image IoUs is a different metric; it is offered separately
(`per_image_miou`) only to compare with papers that used it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def _as_label_array(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"{what} must hold integer labels, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class ConfusionMatrix:
    """hist[g, p] = number of valid pixels with ground truth g predicted as p.

    Pixels whose ground truth is `ignore_index` are skipped. A prediction outside [0, C) at a valid pixel
    is a miss for the ground-truth class (it enlarges that class's union, like mmseg's histogram of
    predictions, which drops out-of-range values); those pixels are kept in `pred_invalid[g]`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.hist = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.pred_invalid = np.zeros(self.num_classes, dtype=np.int64)
        self.n_images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image. pred and gt must have the same shape (resize predictions, never the ground truth)."""
        pred = _as_label_array(pred, "pred")
        gt = _as_label_array(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
        c = self.num_classes
        valid = gt != self.ignore_index
        g = gt[valid]
        p = pred[valid]
        if g.size and (g.min() < 0 or g.max() >= c):
            bad = np.unique(g[(g < 0) | (g >= c)])
            raise ValueError(f"ground truth holds labels {bad[:10].tolist()} outside [0, {c}) that are not "
                             f"ignore_index={self.ignore_index}: wrong dataset or class count?")
        ok = (p >= 0) & (p < c)
        self.hist += np.bincount(c * g[ok] + p[ok], minlength=c * c).reshape(c, c)
        self.pred_invalid += np.bincount(g[~ok], minlength=c)
        self.n_images += 1

    def merge(self, other: "ConfusionMatrix") -> None:
        """Add another matrix's counts (e.g. from a worker or an earlier, resumed run)."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self.hist += other.hist
        self.pred_invalid += other.pred_invalid
        self.n_images += other.n_images

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for resumable runs."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "hist": self.hist.tolist(),
            "pred_invalid": self.pred_invalid.tolist(),
            "n_images": self.n_images,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ConfusionMatrix":
        cm = cls(state["num_classes"], state["ignore_index"])
        hist = np.asarray(state["hist"], dtype=np.int64)
        invalid = np.asarray(state["pred_invalid"], dtype=np.int64)
        if hist.shape != cm.hist.shape or invalid.shape != cm.pred_invalid.shape:
            raise ValueError("state does not match num_classes")
        cm.hist, cm.pred_invalid, cm.n_images = hist, invalid, int(state["n_images"])
        return cm

    # -- scores --------------------------------------------------------------------------------------
    def _counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(true positives, ground-truth pixels, predicted pixels) per class."""
        tp = np.diag(self.hist)
        return tp, self.hist.sum(1) + self.pred_invalid, self.hist.sum(0)

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (GT + P - TP); NaN where the class has zero union."""
        tp, gt, pr = self._counts()
        union = gt + pr - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def accuracy(self) -> float:
        """Pixel accuracy over valid pixels (mmseg aAcc); NaN before any valid pixel."""
        tp, gt, _ = self._counts()
        total = gt.sum()
        return float(tp.sum() / total) if total else math.nan

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        """Report in percent (unrounded): miou (nanmean, tcl/sclip), miou_plain (absent classes count 0,
        candidate protocol), aacc, per-class IoU and the image count. NaN values become None so the
        dict can be written as strict JSON.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for a {self.num_classes}-class matrix")
        iou = self.iou()
        present = ~np.isnan(iou)
        pct = (lambda v: None if v is None or math.isnan(v) else float(v) * 100.0)
        return {
            "miou": pct(float(iou[present].mean()) if present.any() else None),
            "miou_plain": pct(float(np.nan_to_num(iou, nan=0.0).mean())),
            "aacc": pct(self.accuracy()),
            "per_class_iou": {name: pct(float(v)) for name, v in zip(class_names, iou)},
            "n_images": self.n_images,
            "n_valid_pixels": int(self.hist.sum() + self.pred_invalid.sum()),
        }


def image_iou(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Per-class IoU of a single image (NaN for classes absent from both its prediction and its ground truth)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, gt)
    return cm.iou()


def per_image_miou(pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int,
                   ignore_index: int = 255) -> float:
    """Mean over images of each image's mIoU, in percent (NOT the benchmark metric; see §5).

    Exactly: for every image, IoU_c over its valid pixels (gt != ignore_index) for the classes with a
    non-empty union in that image (present in its ground truth or its prediction), averaged over those
    classes; then the plain mean of these image scores over the images that have at least one such
    class. Images with no valid pixel are skipped. Returns NaN when no image counts.
    """
    scores = []
    for pred, gt in pairs:
        iou = image_iou(pred, gt, num_classes, ignore_index)
        if not np.isnan(iou).all():
            scores.append(float(np.nanmean(iou)))
    return float(np.mean(scores)) * 100.0 if scores else math.nan
