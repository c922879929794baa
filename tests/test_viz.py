"""ovss.viz: the VOC palette, overlays with a legend, comparison grids."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ovss import viz


def voc_colour(i: int) -> tuple[int, int, int]:
    """The PASCAL VOC devkit's labelcolormap, restated bit by bit."""
    r = g = b = 0
    c = i
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


def test_palette_is_voc_deterministic_and_distinct():
    pal = viz.palette(256)
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert [tuple(int(v) for v in row) for row in pal] == [voc_colour(i) for i in range(256)]
    assert tuple(pal[0]) == (0, 0, 0) and tuple(pal[15]) == (192, 128, 128)  # VOC: background, person
    assert np.array_equal(pal, viz.palette(256))
    assert np.array_equal(viz.palette(21), pal[:21])
    big = viz.palette(5000)
    assert len({tuple(row) for row in big}) == 5000
    d = np.abs(pal[:, None, :].astype(int) - pal[None, :, :].astype(int)).sum(-1)
    assert d[~np.eye(256, dtype=bool)].min() >= 32  # 256 entries differ by at least one 32-step on a channel


def test_palette_bad_size():
    with pytest.raises(ValueError):
        viz.palette(-1)


def _scene(h=40, w=60):
    img = np.full((h, w, 3), 100, np.uint8)
    labels = np.zeros((h, w), np.int64)
    labels[:, w // 2:] = 1
    labels[: h // 4, : w // 4] = 3
    return img, labels


def test_overlay_blends_classes_and_leaves_background():
    img, labels = _scene()
    classes = ["background", "cat", "dog", "sofa"]
    out = viz.overlay(img, labels, classes, alpha=0.4, legend=False)
    assert out.size == (60, 40)
    o = np.asarray(out).astype(float)
    pal = viz.palette(4).astype(float)
    expected = 0.6 * img.astype(float) + 0.4 * pal[labels]
    fg = labels != 0
    assert np.abs(o[fg] - expected[fg]).max() <= 1.0
    assert np.array_equal(o[~fg], img[~fg].astype(float))
    assert np.all(np.any(o[fg] != img[fg], axis=-1))


def test_overlay_without_background_paints_class_zero():
    img, labels = _scene()
    out = np.asarray(viz.overlay(img, labels, ["sky", "cat", "dog", "sofa"], legend=False))
    assert np.any(out[labels == 0] != img[labels == 0])


def _count_colour(a: np.ndarray, colour) -> int:
    return int(np.all(a == np.asarray(colour, np.uint8), axis=-1).sum())


def test_legend_lists_present_classes_outside_the_image():
    img, labels = _scene()
    classes = ["background", "cat", "dog", "sofa"]
    out = viz.overlay(img, labels, classes)
    assert out.width > 60 and out.height >= 40
    a = np.asarray(out)
    assert np.array_equal(a[:40, :60], np.asarray(viz.overlay(img, labels, classes, legend=False)))
    panel = a[:, 60:]
    pal = viz.palette(4)
    for k in (1, 3):
        assert _count_colour(panel, pal[k]) > 4  # swatch of a present class
    assert _count_colour(panel, pal[2]) == 0  # "dog" is absent: no swatch
    assert (panel < 50).all(axis=-1).sum() > 4  # names are drawn (dark text) besides the black background swatch


def test_legend_on_tiny_image_expands_canvas():
    img = np.zeros((8, 8, 3), np.uint8)
    labels = np.zeros((8, 8), np.int64)
    labels[4:] = 1
    labels[:, 6:] = 2
    out = viz.overlay(img, labels, ["background", "aeroplane", "potted plant"])
    assert out.width > 60 and out.height > 8  # a readable legend does not fit in 8x8: the canvas grows


def test_legend_scales_with_image_size():
    small = viz.overlay(np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), np.int64), ["background", "cat"])
    big = viz.overlay(np.zeros((2000, 2000, 3), np.uint8), np.ones((2000, 2000), np.int64), ["background", "cat"])
    assert big.width - 2000 > 3 * (small.width - 64)


def test_overlay_checks_shapes():
    with pytest.raises(ValueError, match="do not match"):
        viz.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.int64), ["a"])
    with pytest.raises(ValueError, match="outside"):
        viz.overlay(np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 2), ["a", "b"])


def test_grid_layout_and_titles():
    a = Image.new("RGB", (30, 20), (255, 0, 0))
    b = Image.new("RGB", (10, 40), (0, 255, 0))
    c = Image.new("RGB", (30, 20), (0, 0, 255))
    pad = 4
    untitled = viz.grid([[a, b, c], [c, a]], pad=pad)
    # columns 30/30/30 wide (widest image), rows 40/20 high (tallest image), pad around every cell
    assert untitled.size == (3 * 30 + 4 * pad, 40 + 20 + 3 * pad)
    u = np.asarray(untitled)
    x1, x2, y1 = 2 * pad + 30, 3 * pad + 60, 2 * pad + 40
    assert tuple(u[pad + 10 + 5, pad + 5]) == (255, 0, 0)  # a, centred vertically in the 40-high row
    assert tuple(u[pad + 5, pad + 5]) == (255, 255, 255)  # above it: canvas
    assert tuple(u[pad + 20, x1 + 10 + 5]) == (0, 255, 0)  # b, centred horizontally in a 30-wide column
    assert tuple(u[y1 + 5, x1 + 5]) == (255, 0, 0)  # second row, second column: a
    assert tuple(u[y1 + 5, x2 + 5]) == (255, 255, 255)  # short row: empty cell
    g = viz.grid([[a, b, c], [c, a]], titles=["image", "truth", "prediction"], pad=pad)
    assert g.width == untitled.width and g.height > untitled.height
    band = g.height - untitled.height
    assert np.array_equal(np.asarray(g)[band:], u)  # titles only add a band on top
    assert (np.asarray(g)[:band] < 128).any()  # title text drawn
    with pytest.raises(ValueError, match="titles"):
        viz.grid([[a, b]], titles=["one"])


def test_grid_legend_keys_every_class_once_on_the_right():
    classes = ["sky", "grass", "ball"]
    a = viz.overlay(np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), np.int64), classes, legend=False)
    plain = viz.grid([[a, a], [a, a]], ["truth", "method"])
    keyed = viz.grid([[a, a], [a, a]], ["truth", "method"], legend=classes)
    assert keyed.width > plain.width and keyed.height >= plain.height
    k = np.asarray(keyed)
    assert np.array_equal(k[:plain.height, :plain.width], np.asarray(plain))  # the cells are untouched
    panel = k[:, plain.width:]
    for colour in viz.palette(3):  # a swatch per class, absent ones ("grass", "ball") included
        assert _count_colour(panel, colour) > 4
