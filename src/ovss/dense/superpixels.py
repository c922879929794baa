"""Class-agnostic regions (superpixels) and feature pooling inside them, for FreeDA-style region scoring.

Regions come from scikit-image (Felzenszwalb by default, SLIC and watershed as the paper's Table 5
alternatives). Pooling follows the official FreeDA code: each region's binary mask is brought to the feature
grid by bilinear interpolation with `align_corners=True` — point sampling at i·(h−1)/(g−1), which gives soft
weights and lets small regions miss every sample point — or, as an option, by exact fractional area coverage.
All regions are pooled at once through one sparse (regions × pixels) · (pixels × cells) product, which equals
interpolating every one-hot mask separately (freeda.md §4 step 8, trap 5) without materialising them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

SUPERPIXEL_METHODS = ("felzenszwalb", "slic", "watershed", "none")

#: Felzenszwalb (scale, sigma, min_size) of the official configs (freeda.md §4 step 4). VOC21, Context60 and
#: COCO-Object have no config of their own and reuse the VOC, Context and COCO-Stuff presets.
FELZENSZWALB_PRESETS: dict[str, tuple[float, float, int]] = {
    "default": (100.0, 1.0, 20),
    "voc20": (100.0, 0.7, 20), "voc21": (100.0, 0.7, 20),
    "context59": (100.0, 1.0, 20), "context60": (100.0, 1.0, 20),
    "coco_stuff": (100.0, 1.0, 100), "coco_object": (100.0, 1.0, 100),
    "cityscapes": (20.0, 0.5, 50),
    "ade20k": (100.0, 1.0, 20),
}

#: SLIC and watershed settings of the official code's alternatives (freeda.md §6, Table 5 rows).
SLIC_DEFAULTS = dict(n_segments=200, compactness=10.0, sigma=1.0, min_size_factor=0.5, max_num_iter=10)
WATERSHED_DEFAULTS = dict(markers=200, compactness=1e-5)

#: The official pooling's denominator guard: r = Σ mask·F / (Σ mask + eps), eps = float32 machine epsilon.
POOL_EPS = 1.19e-7

PoolMode = Literal["bilinear", "area"]


def felzenszwalb_params(spec: str | Sequence[float]) -> tuple[float, float, int]:
    """A preset name (dataset key or "default") or an explicit (scale, sigma, min_size)."""
    if isinstance(spec, str):
        if spec not in FELZENSZWALB_PRESETS:
            raise ValueError(f"unknown Felzenszwalb preset {spec!r}; use one of {sorted(FELZENSZWALB_PRESETS)} "
                             "or (scale, sigma, min_size)")
        return FELZENSZWALB_PRESETS[spec]
    values = tuple(spec)
    if len(values) != 3:
        raise ValueError(f"Felzenszwalb parameters are (scale, sigma, min_size), got {values!r}")
    return float(values[0]), float(values[1]), int(values[2])


def superpixels(rgb: np.ndarray, method: str = "felzenszwalb", *,
                felzenszwalb: str | Sequence[float] = "default", slic_segments: int = SLIC_DEFAULTS["n_segments"],
                slic_compactness: float = SLIC_DEFAULTS["compactness"],
                watershed_markers: int = WATERSHED_DEFAULTS["markers"],
                watershed_compactness: float = WATERSHED_DEFAULTS["compactness"]) -> np.ndarray | None:
    """Region labels (h, w) int64 numbered 0..R−1 for an RGB crop (h, w, 3) with values 0–255; None for "none".

    The crop is scaled to [0, 1] first, as the official code calls `felzenszwalb(crop / 255, ...)` (trap 11:
    on the resized crop, not the original image).
    """
    if method not in SUPERPIXEL_METHODS:
        raise ValueError(f"unknown superpixel method {method!r}; use one of {SUPERPIXEL_METHODS}")
    if method == "none":
        return None
    from skimage import segmentation

    img = np.asarray(rgb, dtype=np.float64) / 255.0
    if method == "felzenszwalb":
        scale, sigma, min_size = felzenszwalb_params(felzenszwalb)
        labels = segmentation.felzenszwalb(img, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1)
    elif method == "slic":
        labels = segmentation.slic(img, n_segments=slic_segments, compactness=slic_compactness,
                                   sigma=SLIC_DEFAULTS["sigma"], min_size_factor=SLIC_DEFAULTS["min_size_factor"],
                                   max_num_iter=SLIC_DEFAULTS["max_num_iter"], enforce_connectivity=True,
                                   start_label=0, channel_axis=-1)
    else:
        from skimage.color import rgb2gray
        from skimage.filters import sobel

        labels = segmentation.watershed(sobel(rgb2gray(img)), markers=watershed_markers,
                                        compactness=watershed_compactness)
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.int64)


def axis_weights(n: int, g: int, mode: PoolMode = "bilinear") -> np.ndarray:
    """(g, n) weights that take a length-n axis to g cells.

    bilinear: `F.interpolate(..., mode="bilinear", align_corners=True)` along one axis — cell i reads the
    two pixels around position i·(n−1)/(g−1). area: the fraction of cell i = [i·n/g, (i+1)·n/g) that pixel
    y covers, divided by the cell length (exact fractional coverage; rows sum to 1).
    """
    w = np.zeros((g, n), dtype=np.float64)
    if mode == "bilinear":
        pos = np.arange(g) * ((n - 1) / (g - 1)) if g > 1 else np.zeros(1)
        lo = np.clip(np.floor(pos).astype(np.int64), 0, n - 1)
        hi = np.minimum(lo + 1, n - 1)
        frac = pos - lo
        np.add.at(w, (np.arange(g), lo), 1.0 - frac)
        np.add.at(w, (np.arange(g), hi), frac)
        return w
    if mode == "area":
        edges = np.arange(g + 1) * n / g
        for i in range(g):
            a, b = edges[i], edges[i + 1]
            for y in range(int(np.floor(a)), min(int(np.ceil(b)), n)):
                w[i, y] = (min(b, y + 1) - max(a, y)) / (b - a)
        return w
    raise ValueError(f"unknown pooling mode {mode!r}; use 'bilinear' or 'area'")


def region_weights(labels: np.ndarray, grid: tuple[int, int], mode: PoolMode = "bilinear") -> torch.Tensor:
    """M̂ (R, gh·gw) float32: every region's mask resized to the feature grid (R = labels.max() + 1).

    Row r equals `F.interpolate(onehot_r[None, None], grid, mode="bilinear", align_corners=True).flatten()`
    for mode "bilinear"; computed as onehot (R × pixels, sparse) · kron(Wy, Wx)ᵀ.
    """
    labels = np.asarray(labels)
    h, w = labels.shape
    n_regions = int(labels.max()) + 1
    wy = sp.csr_matrix(axis_weights(h, grid[0], mode))
    wx = sp.csr_matrix(axis_weights(w, grid[1], mode))
    cells = sp.kron(wy, wx, format="csr")  # (gh·gw, h·w)
    onehot = sp.csr_matrix((np.ones(h * w), (labels.ravel(), np.arange(h * w))), shape=(n_regions, h * w))
    return torch.from_numpy((onehot @ cells.T).toarray().astype(np.float32))


def pool_regions(features: torch.Tensor, weights: torch.Tensor, eps: float = POOL_EPS) -> torch.Tensor:
    """r = Σ M̂·F / (Σ M̂ + eps) for every region: (R, D) from features (gh·gw, D) and weights (R, gh·gw).

    A region whose weights are all zero (it missed every sample point) pools to a zero vector.
    """
    weights = weights.to(features)
    return (weights @ features) / (weights.sum(1, keepdim=True) + eps)
