"""ovss.io: every input mode/dtype becomes the RGB image a viewer shows; outputs read back exactly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovss import viz
from ovss.io import (ImageLoadError, atomic_write, expand_inputs, load_image, sanitize_name, save_segmentation,
                     write_json)
from ovss.result import Segmentation

WHITE = 255.0


def rgb(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(np.int64)


def grey3(v: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(v, dtype=np.int64)[..., None], 3, axis=2)


def on_white(value: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha compositing over white, restated: c * a + 255 * (1 - a)."""
    a = alpha.astype(np.float64) / 255.0
    return value * a + WHITE * (1.0 - a)


# -- modes ---------------------------------------------------------------------------------------------

def test_rgb_passes_through_unchanged():
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(rgb(load_image(Image.fromarray(a, "RGB"))), a)


def test_mode_1_and_L():
    bits = np.array([[0, 1], [1, 0]], dtype=bool)
    assert np.array_equal(rgb(load_image(Image.fromarray(bits))), grey3(bits * 255))
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.array_equal(rgb(load_image(Image.fromarray(grey, "L"))), grey3(grey))


def test_LA_and_RGBA_composite_on_white():
    v = np.array([[10, 200, 90]], dtype=np.uint8)
    alpha = np.array([[0, 255, 128]], dtype=np.uint8)
    la = Image.fromarray(np.stack([v, alpha], axis=-1), "LA")
    assert np.abs(rgb(load_image(la)) - grey3(on_white(v, alpha))).max() <= 1
    c = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    rgba = Image.fromarray(np.concatenate([c, alpha[..., None]], axis=-1), "RGBA")
    expected = on_white(c.astype(np.float64), alpha[..., None])
    out = rgb(load_image(rgba))
    assert np.abs(out - expected).max() <= 1
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, whatever RGB was under it


def test_P_with_and_without_transparency():
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    pal = [10, 20, 30, 200, 0, 0, 0, 0, 250] + [0] * (256 * 3 - 9)
    p = Image.fromarray(idx, "P")
    p.putpalette(pal)
    colours = np.array(pal).reshape(-1, 3)
    assert np.array_equal(rgb(load_image(p)), colours[idx])
    p.info["transparency"] = 1
    out = rgb(load_image(p))
    assert out[0, 1].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 0].tolist() == [0, 0, 250]


def test_cmyk():
    im = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # no cyan/key, full magenta+yellow = red
    assert np.all(rgb(load_image(im)) == [255, 0, 0])


def _ramp16() -> np.ndarray:
    return np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)


def _expect16(a: np.ndarray) -> np.ndarray:
    return grey3(np.rint(a.astype(np.float64) * 255.0 / 65535.0))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_scaled_by_bit_depth(mode):
    a = _ramp16()
    if mode == "I;16":
        im = Image.fromarray(a)
    elif mode == "I;16B":
        im = Image.frombytes("I;16B", (8, 8), a.astype(">u2").tobytes())
    else:
        im = Image.fromarray(a.astype(np.int32))
    assert im.mode == mode
    out = rgb(load_image(im))
    assert np.array_equal(out, _expect16(a))
    flat = out[..., 0].ravel()
    assert flat.min() == 0 and flat.max() == 255  # full range, not clipped to 255 after 255
    assert np.all(np.diff(flat) >= 0)  # ordering kept
    assert len(np.unique(flat)) > 50  # distinct values not collapsed


def test_16_bit_png_file(tmp_path):
    a = _ramp16()
    Image.fromarray(a).save(tmp_path / "d.png")
    assert np.array_equal(rgb(load_image(tmp_path / "d.png")), _expect16(a))


def test_float_mode_F():
    f = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(rgb(load_image(Image.fromarray(f, "F"))), grey3(np.rint(f.astype(np.float64) * 255)))


# -- numpy ---------------------------------------------------------------------------------------------

def test_numpy_shapes_and_dtypes():
    g = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    assert np.array_equal(rgb(load_image(g)), grey3(g))
    assert np.array_equal(rgb(load_image(g[..., None])), grey3(g))
    c = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    assert np.array_equal(rgb(load_image(c)), c)
    alpha = np.full((4, 5, 1), 0, np.uint8)
    assert np.all(rgb(load_image(np.concatenate([c, alpha], axis=2))) == 255)
    u16 = (c.astype(np.uint16) * 257)  # 8-bit value v as 16-bit v*257 -> v exactly
    assert np.array_equal(rgb(load_image(u16)), c)
    f = c.astype(np.float32) / 255.0
    assert np.array_equal(rgb(load_image(f)), c)
    assert np.array_equal(rgb(load_image(f.astype(np.float64)[..., :1])), grey3(c[..., 0]))


@pytest.mark.parametrize("bad, words", [
    (np.full((3, 3), 1.5, np.float32), "[0, 1]"),
    (np.full((3, 3), np.nan, np.float32), "NaN"),
    (np.zeros((3, 4, 5), np.uint8), "channels"),
    (np.zeros((2, 3, 4, 3), np.uint8), "HxW"),
    (np.full((2, 2), -3, np.int32), "8- or 16-bit"),
])
def test_numpy_refused_clearly(bad, words):
    with pytest.raises(ValueError) as info:
        load_image(bad)
    assert words in str(info.value)


def test_wrong_type_is_type_error():
    with pytest.raises(TypeError):
        load_image(42)


# -- files ---------------------------------------------------------------------------------------------

def test_exif_orientation_6_rotates(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)  # stored 20 wide, 10 high
    a[:5, :5] = [255, 0, 0]  # red block at the stored top-left
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "phone.jpg")
    assert out.size == (10, 20)
    arr = rgb(out)
    assert arr[1, -2, 0] > 200 and arr[1, -2, 1] < 60  # top-left went to top-right
    assert arr[-2, 1, 0] < 60
    assert rgb(load_image(out)).shape == arr.shape  # no second rotation once applied


def test_tiny_and_huge_images(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "tiny.png")
    assert load_image(tmp_path / "tiny.png").size == (8, 8)
    Image.new("L", (6000, 4000), 77).save(tmp_path / "huge.bmp")
    big = load_image(tmp_path / "huge.bmp")
    assert big.size == (6000, 4000) and big.mode == "RGB" and big.getpixel((5999, 3999)) == (77, 77, 77)


@pytest.mark.parametrize("limit", [1000, 6000])  # 10x over PIL's limit (PIL raises) and 1.7x (PIL only warns)
def test_decompression_bomb(tmp_path, monkeypatch, limit):
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "bomb.png")
    assert "decompression bomb" in info.value.reason and info.value.path == str(tmp_path / "bomb.png")


def _png_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name, content, reason", [
    ("missing.png", None, "file not found"),
    ("notes.jpg", b"just some text, not pixels\n", "not an image"),
    ("empty.png", b"", "not an image (empty file)"),
    ("cut.png", "half", "truncated/corrupt"),
    ("header.png", "header", "truncated/corrupt"),
])
def test_load_errors_name_file_and_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    if content == "half":
        path.write_bytes(_png_bytes()[: len(_png_bytes()) // 2])
    elif content == "header":
        path.write_bytes(_png_bytes()[:20])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason.startswith(reason)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="not a file"):
        load_image(tmp_path)


# -- expand_inputs -------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path) -> Path:
    for rel in ["b.png", "a.JPG", "sub/c.tiff", "sub/deeper/d.webp", "notes.txt", ".hidden.png", ".git/e.png",
                "sub/f.Jpeg"]:
        p = tmp_path / "data" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_expand_folder_recursive_sorted_filtered(tree):
    paths, problems = expand_inputs([str(tree / "data")])
    rel = [p.relative_to(tree / "data").as_posix() for p in paths]
    assert rel == ["a.JPG", "b.png", "sub/c.tiff", "sub/deeper/d.webp", "sub/f.Jpeg"]
    assert problems == []


def test_expand_globs_missing_and_duplicates(tree, monkeypatch):
    d = tree / "data"
    paths, problems = expand_inputs([str(d / "b.png"), str(d / "*.png"), str(d / "sub" / "*"), str(d / "nope.png"),
                                     str(d / "*.bmp"), str(tree / "empty"), str(d / "notes.txt")])
    assert [p.name for p in paths] == ["b.png", "c.tiff", "f.Jpeg", "notes.txt"]  # named file kept, glob dup dropped
    assert problems == [(str(d / "nope.png"), "file not found"),
                        (str(d / "*.bmp"), "no images match this pattern"),
                        (str(tree / "empty"), "folder contains no images")]
    monkeypatch.chdir(d)
    paths, problems = expand_inputs(["**"])
    assert sorted(p.as_posix() for p in paths) == ["a.JPG", "b.png", "sub/c.tiff", "sub/deeper/d.webp", "sub/f.Jpeg"]


# -- outputs -------------------------------------------------------------------------------------------

def _seg(h=6, w=9, classes=("background", "cat", "traffic light", "a/b", "a b"), seed=0, meta=None) -> Segmentation:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(classes) - 1, (h, w))  # last class absent
    scores = rng.random((len(classes), h, w)).astype(np.float32)
    return Segmentation(labels, scores, list(classes), meta or {})


def test_label_png_reads_back_exactly(tmp_path):
    seg = _seg(meta={"method": "x", "threshold": np.float32(0.5), "where": Path("/a")})
    files = save_segmentation(seg, tmp_path / "out", "img")
    im = Image.open(files["labels"])
    assert im.mode == "P"
    assert np.array_equal(np.array(im), seg.labels)
    assert np.array_equal(np.array(im.getpalette()[:30]).reshape(-1, 3), viz.palette(10))
    data = json.loads(files["json"].read_text())
    counts = np.bincount(seg.labels.ravel(), minlength=5)
    assert data["classes"] == seg.classes and data["size"] == [9, 6]
    assert data["present"] == {c: n / seg.labels.size for c, n in zip(seg.classes, counts) if n}
    assert "a b" not in data["present"]
    assert data["meta"] == {"method": "x", "threshold": 0.5, "where": "/a"}
    assert "overlay" not in files and "masks" not in files


def test_many_classes_fall_back_to_16_bit(tmp_path):
    classes = ["background"] + [f"c{i}" for i in range(299)]
    labels = np.arange(300 * 2).reshape(2, 300) % 300
    seg = Segmentation(labels, np.zeros((300, 2, 300), np.float32), classes)
    files = save_segmentation(seg, tmp_path, "many")
    assert np.array_equal(np.array(Image.open(files["labels"])).astype(np.int64), labels)


def test_overlay_and_masks_sanitized(tmp_path):
    seg = _seg()
    image = np.full((6, 9, 3), 128, np.uint8)
    files = save_segmentation(seg, tmp_path, "img", image=image, masks=True)
    ov = Image.open(files["overlay"])
    assert ov.height >= 6 and ov.width > 9
    mask_dir = files["masks"]
    assert mask_dir == tmp_path / "img_masks"
    names = sorted(p.name for p in mask_dir.iterdir())
    assert names == ["a_b.png", "background.png", "cat.png", "traffic_light.png"]  # "a b" absent: no file
    m = np.array(Image.open(mask_dir / "a_b.png"))
    assert set(np.unique(m)) <= {0, 255} and np.array_equal(m == 255, seg.labels == 3)


def test_sanitize_name():
    assert sanitize_name("traffic light") == "traffic_light"
    assert sanitize_name("../../etc/passwd") == "etc_passwd"
    assert sanitize_name("   ") == "class"
    assert sanitize_name("potted-plant.v2") == "potted-plant.v2"


def test_same_sanitized_name_gets_distinct_file(tmp_path):
    labels = np.array([[0, 1]])
    seg = Segmentation(labels, np.zeros((2, 1, 2), np.float32), ["a/b", "a b"])
    files = save_segmentation(seg, tmp_path, "x", masks=True)
    assert sorted(p.name for p in files["masks"].iterdir()) == ["a_b.png", "a_b_2.png"]


def test_writes_are_atomic(tmp_path):
    save_segmentation(_seg(), tmp_path, "img", image=np.zeros((6, 9, 3), np.uint8), masks=True)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    target = tmp_path / "keep.json"
    write_json(target, {"v": 1})

    def crash(f):
        f.write(b"{partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"v": 1}
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_segmentation_save_delegates(tmp_path):
    seg = _seg()
    files = seg.save(tmp_path, "s")
    assert np.array_equal(np.array(Image.open(files["labels"])), seg.labels)
