"""Writing a Segmentation to disk: label PNG, overlay, JSON summary and per-class masks.

Every file is written to a temporary name in the same folder and renamed into place, so an interrupted
run never leaves a half-written PNG that a later (resumed) run or an evaluation would trust.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ovss import viz
from ovss.io.images import ImageInput

if TYPE_CHECKING:
    from ovss.result import Segmentation

#: a palette PNG holds 8-bit indices; larger vocabularies (e.g. Pascal Context-459) go to 16-bit grey
_PALETTE_SIZE = 256


@contextmanager
def atomic_path(path: Path, *, durable: bool = False) -> Iterator[Path]:
    """A fresh temporary path next to `path`, renamed over `path` when the block ends without error and
    removed otherwise: for writers that take a file name (faiss), as `atomic_write` is for file objects.

    durable: fsync before the rename, so that a power cut cannot leave a renamed but empty file (caches and
    banks, which a later run trusts; skipped for per-image outputs, where it would cost a sync per file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], *, durable: bool = False) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then rename it over `path` (`atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        # os.open with 0o666 lets the umask decide permissions (mkstemp would leave files private to the owner)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
    return Path(path)


def write_json(path: Path, obj: Any) -> Path:
    """Atomic, indented JSON; numpy values, tensors and paths are converted rather than refused."""
    data = json.dumps(obj, indent=2, default=_jsonable, ensure_ascii=False).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data + b"\n"))


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):  # numpy arrays and torch tensors
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def save_png(path: Path, im: Image.Image) -> Path:
    return atomic_write(path, lambda f: im.save(f, format="PNG"))


def label_image(labels: np.ndarray, n_classes: int) -> Image.Image:
    """Label map as a palette PNG image (mode "P", pixel value = class index), 16-bit grey beyond 256 classes."""
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels take values outside [0, {n_classes})")
    if n_classes <= _PALETTE_SIZE:
        im = Image.fromarray(labels.astype(np.uint8), "P")
        im.putpalette(viz.palette(_PALETTE_SIZE).ravel().tolist())
        return im
    return Image.fromarray(labels.astype(np.uint16))


def sanitize_name(name: str) -> str:
    """A class name as a portable file name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return safe or "class"


def _unique_names(names: list[str]) -> list[str]:
    """Sanitised names made distinct ("a/b" and "a b" would both be "a_b"); case-insensitive filesystems."""
    used: set[str] = set()
    out = []
    for name in names:
        base = sanitize_name(name)
        cand, k = base, 2
        while cand.lower() in used:
            cand, k = f"{base}_{k}", k + 1
        used.add(cand.lower())
        out.append(cand)
    return out


def save_segmentation(seg: "Segmentation", out_dir: Path, stem: str, *, image: ImageInput | None = None,
                      masks: bool = False) -> dict[str, Path]:
    """Write `<stem>.png` (labels), `<stem>_overlay.png` (if `image`), `<stem>.json`, `<stem>_masks/` (if `masks`).

    Returns the written paths under the keys "labels", "json", "overlay" and "masks" (the folder).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(seg.labels)
    files: dict[str, Path] = {
        "labels": save_png(out_dir / f"{stem}.png", label_image(labels, len(seg.classes)))}
    if image is not None:
        files["overlay"] = save_png(out_dir / f"{stem}_overlay.png", viz.overlay(image, labels, seg.classes))
    if masks:
        mask_dir = out_dir / f"{stem}_masks"
        mask_dir.mkdir(exist_ok=True)
        names = _unique_names(list(seg.classes))  # over all classes: a class keeps its file name in every image
        for idx in np.unique(labels):
            save_png(mask_dir / f"{names[idx]}.png", Image.fromarray(np.where(labels == idx, 255, 0).astype(np.uint8), "L"))
        files["masks"] = mask_dir
    summary = {"classes": list(seg.classes), "present": seg.fractions(), "size": list(seg.size), "meta": seg.meta}
    files["json"] = write_json(out_dir / f"{stem}.json", summary)
    return files
