"""Protocol geometry: mmcv resize arithmetic, the mmseg window grid, stitching, per-dataset protocols."""
import numpy as np
import pytest
import torch
from PIL import Image

from ovss.dense.windows import (
    resize_image,
    resize_short_side,
    resize_short_side_truncate,
    slide_inference,
    window_grid,
    window_set,
)
from ovss.eval.protocols import PROTOCOLS, get_protocol


def test_resize_short_side_mmcv_rule():
    assert resize_short_side((2048, 1024), 448) == (896, 448)  # long side cap wins
    assert resize_short_side((500, 375), 448) == (597, 448)  # 500 * 448/375 = 597.33
    assert resize_short_side((375, 500), 448) == (448, 597)
    assert resize_short_side((333, 500), 448) == (448, int(500 * 448 / 333 + 0.5))  # 672.67 -> 673
    assert resize_short_side((2048, 1024), 560) == (1120, 560)
    assert resize_short_side((100, 3000), 448, long_cap=2048) == (int(100 * 2048 / 3000 + 0.5), 2048)


def test_resize_short_side_truncate_differs_in_rounding():
    assert resize_short_side_truncate((333, 500), 448) == (448, 672)  # 672.67 truncated
    assert resize_short_side((333, 500), 448) == (448, 673)
    assert resize_short_side_truncate((500, 375), 448) == (597, 448)
    assert resize_short_side_truncate((4000, 100), 448) == (17920, 448)  # no cap


def test_window_grid_counts_and_positions():
    # 448-short VOC image, crop 448 / stride 224: one row, two columns, last one flush with the border.
    assert window_grid(448, 597, 448, 224) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    # Cityscapes at 896x448.
    wins = window_grid(448, 896, 448, 224)
    assert [(x1, x2) for _, _, x1, x2 in wins] == [(0, 448), (224, 672), (448, 896)]
    # sclip grid: 336x500 with crop 224 / stride 112.
    wins = window_grid(336, 500, 224, 112)
    n_rows = (336 - 224 + 111) // 112 + 1
    n_cols = (500 - 224 + 111) // 112 + 1
    assert (n_rows, n_cols) == (2, 4) and len(wins) == 8
    assert wins[-1] == (112, 336, 276, 500)
    assert wins[:4] == [(0, 224, 0, 224), (0, 224, 112, 336), (0, 224, 224, 448), (0, 224, 276, 500)]


def test_window_grid_smaller_than_crop_gives_one_small_window():
    assert window_grid(100, 300, 448, 224) == [(0, 100, 0, 300)]
    assert window_grid(100, 500, 448, 224) == [(0, 100, 0, 448), (0, 100, 52, 500)]


def test_window_grid_covers_image_for_many_sizes():
    for h, w in [(1, 1), (223, 225), (448, 448), (449, 1000), (672, 673)]:
        cover = np.zeros((h, w), dtype=int)
        for y1, y2, x1, x2 in window_grid(h, w, 448, 224):
            assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
            assert y2 - y1 == min(448, h) and x2 - x1 == min(448, w)
            cover[y1:y2, x1:x2] += 1
        assert cover.min() >= 1


def test_ovdiff_window_set():
    # ovdiff.md: a 448x597 image gets 2 + 6 + 1 = 9 windows.
    wins = window_set(448, 597, (448, 336), 224, whole_image=True)
    assert len(wins) == 9 and wins[-1] == (0, 448, 0, 597)
    assert get_protocol("ovdiff", "voc21").windows(448, 597) == wins


def test_slide_inference_equals_direct_average():
    torch.manual_seed(0)
    h, w, k = 13, 20, 3
    image = torch.rand(3, h, w) * 255
    weight = torch.randn(k, 3)

    def score_fn(crop):  # position-dependent so that overlaps matter: depends on the crop's own size
        return torch.einsum("kc,chw->khw", weight, crop) + crop.shape[-1] * torch.arange(k)[:, None, None]

    for crop, stride, extra, whole in [(8, 4, (), False), (8, 5, (6,), True), (32, 16, (), False)]:
        out = slide_inference(score_fn, image, crop, stride, k, extra_crops=extra, whole_image=whole)
        total = torch.zeros(k, h, w)
        count = torch.zeros(h, w)
        for y1, y2, x1, x2 in window_set(h, w, (crop, *extra), stride, whole):
            s = score_fn(image[:, y1:y2, x1:x2])
            for y in range(y1, y2):
                for x in range(x1, x2):
                    total[:, y, x] += s[:, y - y1, x - x1]
                    count[y, x] += 1
        torch.testing.assert_close(out, total / count[None])


def test_slide_inference_upsamples_low_resolution_scores():
    image = torch.zeros(3, 8, 8)
    const = torch.tensor([1.0, -2.0])[:, None, None]
    out = slide_inference(lambda c: const.expand(2, 2, 2).clone(), image, 4, 4, 2)
    torch.testing.assert_close(out, const.expand(2, 8, 8))
    with pytest.raises(ValueError):
        slide_inference(lambda c: torch.zeros(3, 4, 4), image, 4, 4, 2)


def test_resize_image_modes():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    up = resize_image(img, (16, 12), "mmcv_bilinear")
    assert up.size == (16, 12) and up.mode == "RGB"
    # 2x upsampling with half-pixel centres: output pixel (2, 2) samples input (0.75, 0.75).
    a = np.asarray(img, dtype=np.float64)
    expected = 0.0625 * a[0, 0] + 0.1875 * a[0, 1] + 0.1875 * a[1, 0] + 0.5625 * a[1, 1]
    np.testing.assert_allclose(np.asarray(up)[2, 2], np.round(expected), atol=1)
    assert resize_image(img, (4, 3), "pil_lanczos").size == (4, 3)
    with pytest.raises(ValueError):
        resize_image(img, (4, 3), "cubic")


def test_protocol_table():
    tcl = get_protocol("tcl", "voc21")
    assert (tcl.short_side, tcl.crop, tcl.stride, tcl.mean) == (448, 448, 224, "nan")
    assert tcl.scaled_size((2048, 1024)) == (896, 448)
    sclip = {k: get_protocol("sclip", k) for k in ("voc21", "coco_stuff", "cityscapes", "ade20k")}
    assert {k: p.short_side for k, p in sclip.items()} == {
        "voc21": 336, "coco_stuff": 448, "cityscapes": 560, "ade20k": 336}
    assert (sclip["voc21"].crop, sclip["voc21"].stride) == (224, 112)
    assert PROTOCOLS["sclip"].short_side == 336  # the shared table is not mutated
    ov = get_protocol("ovdiff", "context60")
    assert ov.resize == "pil_lanczos" and ov.extra_windows == (336,) and ov.whole_image
    assert ov.scaled_size((333, 500)) == (448, 672)
    cand = get_protocol("candidates", "coco_object")
    assert cand.mean == "plain" and cand.vocabulary == "candidates" and not cand.sliding
    assert cand.windows(300, 200) == [(0, 300, 0, 200)]
    img = Image.new("RGB", (37, 23))
    assert cand.prepare(img) is img
    assert get_protocol("tcl", "voc21").prepare(img).size == resize_short_side((37, 23), 448)
    with pytest.raises(ValueError, match="only for"):
        get_protocol("candidates", "ade20k")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_protocol("tcl", "voc")
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("mmseg", "voc21")
    assert tcl.to_dict()["name"] == "tcl"
