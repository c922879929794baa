"""Colours, overlays and comparison grids: how a label map is shown to a person.

The palette is the PASCAL VOC one (index 0 black, then the colours every segmentation paper's figures
use), so our label PNGs look like the datasets' ground truth when opened side by side.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ovss.io.images import ImageInput, load_image

#: VOC's colour map spreads the bits of an index over the high bits of R, G, B: 8 rounds of 3 bits
#: give distinct colours for up to 2**24 indices, 256 of them for a palette PNG
_VOC_ROUNDS = 8

_LEGEND_TEXT = (0, 0, 0)
_LEGEND_OUTLINE = (96, 96, 96)
_CANVAS = (255, 255, 255)


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, deterministic and pairwise distinct; index 0 (background) is black."""
    if not 0 <= n <= 1 << 24:
        raise ValueError(f"palette size must be in [0, 2**24], got {n}")
    idx = np.arange(n, dtype=np.int64)
    out = np.zeros((n, 3), dtype=np.int64)
    c = idx.copy()
    for j in range(_VOC_ROUNDS):
        for ch in range(3):
            out[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    return out.astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _font_size(width: int, height: int) -> int:
    """Text about 1/50 of the long side: readable when a 6000 px photo is shown on a screen."""
    return int(np.clip(round(max(width, height) / 50), 10, 160))


def overlay(image: ImageInput, labels: np.ndarray, classes: Sequence[str], alpha: float = 0.5,
            legend: bool = True) -> Image.Image:
    """The image blended with class colours; "background" (index 0 when named so) is left unpainted.

    The legend lists the classes present and sits in a panel to the right of the image (the canvas grows),
    so it never hides pixels and still fits next to an 8x8 image.
    """
    img = load_image(image)
    labels = np.asarray(labels)
    if labels.shape != (img.height, img.width):
        raise ValueError(f"labels {labels.shape} do not match the image size {img.height}x{img.width} (HxW)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels take values outside [0, {len(classes)}) for {len(classes)} classes")
    pal = palette(len(classes))
    # PIL's 8-bit blend/composite: a 6000x4000 photo costs a few uint8 copies, not float32 ones
    result = Image.blend(img, Image.fromarray(pal[labels], "RGB"), alpha)
    if classes and classes[0] == "background":
        result = Image.composite(result, img, Image.fromarray((labels != 0).astype(np.uint8) * 255, "L"))
    if not legend:
        return result
    present = [int(i) for i in np.unique(labels)]
    return _with_legend(result, _legend_entries(classes, present))


def _legend_entries(classes: Sequence[str], indices: Iterable[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, palette colour) of the given class indices, the colours `overlay` paints them with."""
    pal = palette(len(classes))
    return [(classes[i], tuple(int(v) for v in pal[i])) for i in indices]


def _with_legend(img: Image.Image, entries: list[tuple[str, tuple[int, ...]]],
                 size: int | None = None) -> Image.Image:
    size = size or _font_size(img.width, img.height)
    font = _font(size)
    pad = max(2, size // 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(probe.textlength(name, font=font)) for name, _ in entries), default=0)
    line_h = size + pad
    panel_w = pad + size + pad + text_w + pad
    panel_h = pad + len(entries) * line_h
    canvas = Image.new("RGB", (img.width + panel_w, max(img.height, panel_h)), _CANVAS)
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = img.width + pad
    for k, (name, colour) in enumerate(entries):
        y = pad + k * line_h
        draw.rectangle([x0, y, x0 + size - 1, y + size - 1], fill=colour, outline=_LEGEND_OUTLINE)
        draw.text((x0 + size + pad, y + size // 2), name, fill=_LEGEND_TEXT, font=font, anchor="lm")
    return canvas


def grid(rows: Sequence[Sequence[Image.Image]], titles: Sequence[str] | None = None, *, pad: int = 4,
         legend: Sequence[str] | None = None) -> Image.Image:
    """Images in rows and columns (e.g. image | truth | prediction per row), with optional column titles.

    Each column is as wide as its widest image and each row as tall as its tallest; images are centred.
    legend: the class list the cells were painted with (`overlay(..., legend=False)` over these classes), keyed
    once on the right: per-cell legends would repeat it in every cell and make the columns uneven.
    """
    if not rows or not any(rows):
        raise ValueError("grid needs at least one image")
    ncols = max(len(r) for r in rows)
    if titles is not None and len(titles) != ncols:
        raise ValueError(f"{len(titles)} titles for {ncols} columns")
    cells = [[load_image(im) for im in row] for row in rows]
    col_w = [max((r[c].width for r in cells if c < len(r)), default=0) for c in range(ncols)]
    row_h = [max((im.height for im in r), default=0) for r in cells]
    size = _font_size(max(col_w), max(row_h))
    title_h = size + 2 * pad if titles else 0
    width = sum(col_w) + pad * (ncols + 1)
    height = title_h + sum(row_h) + pad * (len(cells) + 1)
    canvas = Image.new("RGB", (width, height), _CANVAS)
    draw = ImageDraw.Draw(canvas)
    xs = [pad + sum(col_w[:c]) + pad * c for c in range(ncols)]
    if titles:
        font = _font(size)
        for c, title in enumerate(titles):
            draw.text((xs[c] + col_w[c] // 2, pad + size // 2), title, fill=_LEGEND_TEXT, font=font, anchor="mm")
    y = title_h + pad
    for r, row in enumerate(cells):
        for c, im in enumerate(row):
            canvas.paste(im, (xs[c] + (col_w[c] - im.width) // 2, y + (row_h[r] - im.height) // 2))
        y += row_h[r] + pad
    if legend is None:
        return canvas
    return _with_legend(canvas, _legend_entries(legend, range(len(legend))), size)
