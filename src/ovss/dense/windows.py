"""Protocol geometry: keep-ratio resizes, the mmseg sliding-window grid, and sum/count stitching.

These follow mmseg 0.27 / mmcv arithmetic exactly (evaluation.md §2), because a one-pixel shift in a
size or a window moves the benchmark numbers (trap 6).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Window = tuple[int, int, int, int]  # (y1, y2, x1, x2), end-exclusive


def resize_short_side(size_wh: tuple[int, int], short: int, long_cap: int = 2048) -> tuple[int, int]:
    """mmcv keep-ratio rescale to the scale (long_cap, short): s = min(cap/long, short/short_side),
    new size (int(w*s + 0.5), int(h*s + 0.5)). Cityscapes 2048x1024 at 448 -> 896x448.
    """
    w, h = size_wh
    s = min(long_cap / max(w, h), short / min(w, h))
    return int(w * s + 0.5), int(h * s + 0.5)


def resize_short_side_truncate(size_wh: tuple[int, int], short: int) -> tuple[int, int]:
    """torchvision `Resize(short)` rule used by OVDiff's evaluator: short side = short, long side
    int(short * long / short_side), truncated; no cap."""
    w, h = size_wh
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def resize_image(image: Image.Image, size_wh: tuple[int, int], method: str) -> Image.Image:
    """Resize an RGB image for a protocol.

    "mmcv_bilinear": bilinear with half-pixel centres and no antialiasing, rounded to uint8 — OpenCV's
    INTER_LINEAR up to its fixed-point rounding (about one intensity level; use OpenCV for bit parity).
    "pil_lanczos": PIL LANCZOS (antialiased), as OVDiff's evaluator.
    """
    size_wh = (int(size_wh[0]), int(size_wh[1]))
    if image.size == size_wh:
        return image
    if method == "pil_lanczos":
        return image.resize(size_wh, Image.LANCZOS)
    if method == "mmcv_bilinear":
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        y = F.interpolate(x, size=(size_wh[1], size_wh[0]), mode="bilinear", align_corners=False, antialias=False)
        arr = y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        return Image.fromarray(arr, "RGB")
    raise ValueError(f"unknown resize method {method!r}; use 'mmcv_bilinear' or 'pil_lanczos'")


def _grid_1d(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    n = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        start = i * stride
        end = min(start + crop, size)
        out.append((max(end - crop, 0), end))
    return out


def window_grid(h: int, w: int, crop: int, stride: int) -> list[Window]:
    """mmseg `slide_inference` windows (y1, y2, x1, x2), row-major.

    n_rows = max(H - crop + stride - 1, 0) // stride + 1 (same for columns); y1 = i*stride,
    y2 = min(y1 + crop, H), y1 = max(y2 - crop, 0). No padding: an image smaller than the crop yields
    one smaller window.
    """
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be >= 1, got {crop}, {stride}")
    return [(y1, y2, x1, x2) for y1, y2 in _grid_1d(h, crop, stride) for x1, x2 in _grid_1d(w, crop, stride)]


def window_set(h: int, w: int, crops: Sequence[int], stride: int, whole_image: bool = False) -> list[Window]:
    """Grids of several crop sizes with one stride, optionally plus the whole image (OVDiff: 448 and 336
    at stride 224 plus the whole image)."""
    windows = [win for crop in crops for win in window_grid(h, w, crop, stride)]
    if whole_image:
        windows.append((0, h, 0, w))
    return windows


def slide_inference(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    crop: int,
    stride: int,
    num_classes: int,
    *,
    extra_crops: Sequence[int] = (),
    whole_image: bool = False,
) -> torch.Tensor:
    """Score every window and average overlaps: canvas of summed scores / per-pixel window count.

    image: (3, H, W). score_fn(crop (3, h, w)) -> (num_classes, h', w'); maps not at the window size
    (e.g. patch logits) are resized bilinearly (align_corners=False) to it first, as mmseg does.
    Returns (num_classes, H, W) float32 at the image's (resized) size.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    canvas = None
    count = torch.zeros((h, w), dtype=torch.float32, device=image.device)
    for y1, y2, x1, x2 in window_set(h, w, (crop, *extra_crops), stride, whole_image):
        scores = score_fn(image[:, y1:y2, x1:x2])
        if scores.ndim != 3 or scores.shape[0] != num_classes:
            raise ValueError(f"score_fn returned {tuple(scores.shape)}; expected ({num_classes}, h, w)")
        scores = scores.float()
        if tuple(scores.shape[-2:]) != (y2 - y1, x2 - x1):
            scores = F.interpolate(scores[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
        if canvas is None:
            canvas = torch.zeros((num_classes, h, w), dtype=torch.float32, device=scores.device)
            count = count.to(scores.device)
        canvas[:, y1:y2, x1:x2] += scores
        count[y1:y2, x1:x2] += 1
    assert canvas is not None and bool((count > 0).all())
    return canvas / count
