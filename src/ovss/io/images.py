"""Turning whatever the user hands us into one RGB 8-bit PIL image, and paths/globs into image files.

Every method sees the same normalised image, so a 16-bit TIFF, a transparent PNG or a rotated phone
photo segments the way it looks in a viewer. Failures name the file and say what is wrong with it.
"""
from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

#: extensions picked up when a folder or glob is expanded (compared case-insensitively)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

#: leading bytes of the formats above: a file that starts like an image but fails to decode is
#: "truncated/corrupt", not "not an image"
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")

#: EXIF tag holding the camera orientation
_EXIF_ORIENTATION = 0x0112

#: transparent pixels are composited on white: that is how viewers and web pages show them, and the
#: RGB values under alpha=0 are arbitrary (often black), which would otherwise segment as dark objects
_ALPHA_BACKGROUND = (255, 255, 255)


class ImageLoadError(ValueError):
    """An input that cannot be read as an image; `path` and `reason` are kept for reports."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_image(x: ImageInput) -> Image.Image:
    """Return `x` as an RGB 8-bit image: paths are opened, arrays converted, EXIF orientation applied."""
    if isinstance(x, Image.Image):
        return _to_rgb(_upright(x))
    if isinstance(x, np.ndarray):
        return _array_to_rgb(x)
    if isinstance(x, (str, os.PathLike)):
        return _open_file(Path(x))
    raise TypeError(f"expected a path, PIL image or numpy array, got {type(x).__name__}")


def _open_file(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if not path.is_file():
        raise ImageLoadError(path, "not a file (a folder?)")
    try:
        with warnings.catch_warnings():  # the size check below turns PIL's bomb warning into an error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(path, f"decompression bomb: {err}") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, _undecodable(path)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageLoadError(path, f"truncated/corrupt ({err})") from None
    with im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and im.width * im.height > limit:
            raise ImageLoadError(
                path, f"decompression bomb: {im.width}x{im.height} = {im.width * im.height} pixels is more than "
                      f"PIL's limit of {limit} (raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)")
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageLoadError(path, f"truncated/corrupt ({err})") from None
        try:
            return _to_rgb(_upright(im))
        except ValueError as err:
            raise ImageLoadError(path, f"unsupported image data: {err}") from None


def _undecodable(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "not an image (empty file)"
    return "truncated/corrupt (image header not readable)" if head.startswith(_MAGIC) else "not an image"


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways with a tag saying so)."""
    if im.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
        return im
    return ImageOps.exif_transpose(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _array_to_rgb(np.asarray(im), source=f"{mode} image")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*_ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot convert a {mode} image to RGB: {err}") from None


def _array_to_rgb(a: np.ndarray, source: str = "array") -> Image.Image:
    """HxW / HxWx1..4 arrays in bool, 8-bit, 16-bit (scaled by 65535) or float [0, 1] -> RGB."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)):
        raise ValueError(f"{source} of shape {a.shape}: expected HxW or HxWxC with C in 1..4 (channels last)")
    u8 = _to_uint8(a, source)
    if u8.ndim == 2:
        return Image.fromarray(u8, "L").convert("RGB")
    mode = {2: "LA", 3: "RGB", 4: "RGBA"}[u8.shape[2]]
    return _to_rgb(Image.fromarray(np.ascontiguousarray(u8), mode))


def _to_uint8(a: np.ndarray, source: str) -> np.ndarray:
    """Scale by the data's bit depth: 16-bit 65535 -> 255 keeps order and full range (clipping would not)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:  # either byte order (I;16B arrays are big-endian)
        return _scale(a.astype(np.float64), 65535.0)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:  # 32-bit "I" images almost always hold 16-bit data (PNG/TIFF/DICOM)
            return _scale(a.astype(np.float64), 65535.0)
        raise ValueError(f"{source} of {a.dtype} has values in [{lo}, {hi}]: expected 8- or 16-bit data")
    if np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ValueError(f"{source} contains NaN or infinite values")
        lo, hi = (float(f.min()), float(f.max())) if f.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float {source} has values in [{lo:g}, {hi:g}]: expected [0, 1]")
        return _scale(f, 1.0)
    raise ValueError(f"unsupported {source} dtype {a.dtype}")


def _scale(f: np.ndarray, full: float) -> np.ndarray:
    return np.clip(np.rint(f * (255.0 / full)), 0, 255).astype(np.uint8)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(inputs: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (recursive, sorted, image extensions only, hidden files skipped) and globs -> image paths.

    Returns (paths, problems); problems are (input, reason) for inputs that match nothing. A file named
    explicitly is always kept (whether it is an image is for `load_image` to say); duplicates are dropped,
    first occurrence wins.
    """
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for item in inputs:
        p = Path(item)
        if p.is_file():
            add(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and is_image_file(f) and not _is_hidden(f.relative_to(p)))
            if not found:
                problems.append((item, "folder contains no images"))
            for f in found:
                add(f)
        elif any(c in item for c in "*?["):
            found = sorted(Path(m) for m in glob.glob(item, recursive=True))
            found = [f for f in found if f.is_file() and is_image_file(f)]
            if not found:
                problems.append((item, "no images match this pattern"))
            for f in found:
                add(f)
        else:
            problems.append((item, "file not found"))
    return paths, problems


def _is_hidden(rel: Path) -> bool:
    """Dot files/folders (macOS "._x.jpg" forks, .git) are not the user's images."""
    return any(part.startswith(".") for part in rel.parts)
