"""The request handlers of `ovss serve`, as plain functions over bytes, strings and numbers.

The web layer (server.py) only wires widgets to `ServeApp.run` and the small helpers here, so everything a
request can do is testable without a browser. The app has no segmentation logic of its own: it decodes
the upload under size limits, calls `ovss.create(...).segment(...)` and turns the Segmentation into
pictures and files. Nothing in a request names a server-side path: images arrive as bytes, toy scenes and
vocabularies are picked by name from fixed lists, and class names only reach file names sanitised.
"""
from __future__ import annotations

import io
import logging
import shutil
import tempfile
import threading
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

import ovss
from ovss.data.names import BACKGROUND, DATASET_CLASSES
from ovss.io import ImageLoadError, load_image, sanitize_name, save_segmentation
from ovss.result import Segmentation
from ovss.text.classes import parse_class_list, validate_classes
from ovss.toy import TOY_CLASSES, TOY_THINGS, make_scene, split_seeds
from ovss.viz import grid, overlay

if TYPE_CHECKING:
    from ovss.methods.base import Method

log = logging.getLogger(__name__)

#: an upload larger than this is refused before it is decoded (a 50-megapixel JPEG is about 20 MiB)
MAX_UPLOAD_BYTES = 25 * 2**20
#: an image with more pixels is refused from its header, before decoding (decompression bombs); 50 MP
#: admits every phone and DSLR photo, while a 50 MP RGB image already takes 150 MB decoded
MAX_PIXELS = 50_000_000
#: a vocabulary longer than this is refused (the largest benchmark vocabulary, COCO-Stuff, has 171)
MAX_CLASSES = 256
#: longer class names are refused: they are words, not paragraphs, and they end up in captions and files
MAX_CLASS_NAME = 100
#: images shown in the page are at most this many pixels on the long side (downloads keep the full size)
DISPLAY_SIDE = 768
#: at most this many score maps are shown per method (a 150-class vocabulary would otherwise flood the page)
MAX_HEATMAPS = 32
#: side of the bundled toy scenes, and how many of them are offered
TOY_SCENE_SIDE = 256
TOY_SCENE_COUNT = 8
#: how many finished requests keep their download folder (older ones are deleted)
KEPT_REQUESTS = 32

MODEL_PRESETS = ("toy", "tiny", "paper")
#: listed (and preselected) first when offered: the reference method
DEFAULT_METHOD = "faseg"
UPLOAD_NAME = "upload"
TINY_FALLBACK_NOTE = ("The toy-world models are not installed, so `toy` runs on **tiny random-weight models**: "
                      "the pictures show the pipeline working end to end, not segmentation quality.")

#: the formats an upload may be in; anything else (PSD, EPS, ICO, ...) is refused rather than parsed
_UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
#: viridis at five stops: a perceptually ordered, colour-blind-safe ramp for score maps
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)


class ServeError(ValueError):
    """A bad request (no image, bad class list, unknown choice): shown to the user as one message."""


def toy_scene_names() -> list[str]:
    return [f"toy scene {i + 1}" for i in range(TOY_SCENE_COUNT)]


def _vocabularies() -> dict[str, list[str]]:
    """Vocabulary name -> class names; the benchmarks' lists without "background" (the methods add it)."""
    out: dict[str, list[str]] = {"toy things": list(TOY_THINGS), "toy world": list(TOY_CLASSES)}
    for key, names in DATASET_CLASSES.items():
        fg = [n for n in names if n != BACKGROUND]
        if fg not in out.values():  # voc21 without background is voc20
            out[key] = fg
    return out


VOCABULARIES: dict[str, list[str]] = _vocabularies()


def vocabulary_text(name: str) -> str:
    """The comma-separated class list of a named vocabulary (to fill the classes box)."""
    if name not in VOCABULARIES:
        raise ServeError(f"unknown vocabulary {name!r}; choose one of {', '.join(VOCABULARIES)}")
    return ", ".join(n.strip() for n in VOCABULARIES[name])


def decode_upload(data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Uploaded bytes -> RGB image; refuses large files, huge dimensions (read from the header) and non-images."""
    if not data:
        raise ImageLoadError(UPLOAD_NAME, "not an image (empty file)")
    if len(data) > max_bytes:
        raise ImageLoadError(UPLOAD_NAME, f"the file is {len(data) / 2**20:.1f} MiB; the limit is "
                                          f"{max_bytes / 2**20:.1f} MiB")
    try:
        with warnings.catch_warnings():  # the explicit pixel check below gives the message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_UPLOAD_FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(UPLOAD_NAME, f"refused as a possible decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(UPLOAD_NAME, f"not an image, or not one of {', '.join(_UPLOAD_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageLoadError(UPLOAD_NAME, f"truncated/corrupt ({err})") from None
    with im:
        pixels = im.width * im.height
        if pixels > max_pixels:
            raise ImageLoadError(UPLOAD_NAME, f"refused as a possible decompression bomb: {im.width}x{im.height} = "
                                              f"{pixels} pixels is more than the limit of {max_pixels}")
        try:
            im.load()
            return load_image(im)
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageLoadError(UPLOAD_NAME, f"truncated/corrupt ({err})") from None


def toy_scene(name: str, side: int = TOY_SCENE_SIDE) -> Image.Image:
    """A bundled toy scene by its menu name (scenes of the toy world's test split)."""
    names = toy_scene_names()
    if name not in names:
        raise ServeError(f"unknown toy scene {name!r}; choose one of {', '.join(names)}")
    return make_scene(split_seeds("test")[names.index(name)], side).image


def parse_classes(text: str, max_classes: int = MAX_CLASSES) -> list[str]:
    """Comma- or newline-separated names -> validated class list (ovss.text.classes rules, plus size limits)."""
    names = parse_class_list(text or "")
    if names == [""]:
        names = []
    if len(names) > max_classes:
        raise ServeError(f"{len(names)} classes; at most {max_classes} are accepted")
    for name in names:
        if len(name) > MAX_CLASS_NAME:
            raise ServeError(f"class name {name[:40]!r}... is longer than {MAX_CLASS_NAME} characters")
        if not name.isprintable():
            raise ServeError(f"class name {name!r} contains control characters")
    try:
        return validate_classes(names)
    except ValueError as err:
        raise ServeError(str(err)) from None


def heatmap(scores: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> Image.Image:
    """(H, W) scores -> RGB image on the viridis ramp, `lo` dark purple to `hi` yellow (clipped)."""
    t = np.clip((np.asarray(scores, dtype=np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(_VIRIDIS))
    rgb = np.stack([np.interp(t, stops, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


def _display_size(width: int, height: int, side: int = DISPLAY_SIDE) -> tuple[int, int]:
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Label map resized by nearest neighbour to (width, height), for display."""
    h, w = labels.shape
    if (w, h) == size:
        return labels
    ys = np.minimum((np.arange(size[1]) + 0.5) * h / size[1], h - 1).astype(np.int64)
    xs = np.minimum((np.arange(size[0]) + 0.5) * w / size[0], w - 1).astype(np.int64)
    return labels[np.ix_(ys, xs)]


@dataclass
class ServeConfig:
    """What the server operator chooses; requests choose only among these."""

    models: str = "toy"  # default preset in the page: toy | tiny | paper
    methods: list[str] | None = None  # offered methods; None: every registered method
    device: str | None = None
    dtype: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> Config overrides
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_PIXELS
    max_classes: int = MAX_CLASSES
    max_warm: int = 4  # segmenters kept loaded (least recently used ones are dropped)
    work_dir: Path | None = None  # where download files go; None: a fresh temporary folder

    def __post_init__(self) -> None:
        if self.models not in MODEL_PRESETS:
            raise ValueError(f"models={self.models!r}; choose one of {', '.join(MODEL_PRESETS)}")
        available = ovss.list_methods()
        unknown = [m for m in self.methods or [] if m not in available]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(available)}")
        if self.methods is not None and not self.methods:
            raise ValueError("no methods to offer")


@dataclass
class RunRequest:
    """One press of "Segment": an uploaded image (bytes) or a toy scene name, classes and choices."""

    classes: str
    methods: list[str]
    upload: bytes | None = None
    toy_scene: str | None = None
    models: str = "toy"
    background: bool = True
    bg_threshold: float | None = None  # None: each method's own default


@dataclass
class MethodView:
    """What the page shows for one method."""

    method: str
    overlay: Image.Image | None = None  # display size, with legend
    masks: list[tuple[Image.Image, str]] = field(default_factory=list)  # per class present
    heatmaps: list[tuple[Image.Image, str]] = field(default_factory=list)  # per scored class
    files: list[Path] = field(default_factory=list)  # label PNG, JSON, overlay PNG, masks ZIP
    summary: str = ""  # Markdown
    error: str | None = None
    segmentation: Segmentation | None = None


@dataclass
class RunResult:
    image: Image.Image
    classes: list[str]
    models: str  # the preset actually used (toy may have fallen back to tiny)
    note: str
    views: list[MethodView]
    comparison: Image.Image | None  # input | each method's overlay, side by side


Progress = Callable[[float, str], None]


@cache
def _toy_models_installed() -> bool:
    from ovss.demo import toy_models_installed

    return toy_models_installed()


def resolve_models(requested: str) -> tuple[str, str]:
    """(preset to use, note for the page): "toy" falls back to "tiny" while the toy models are not installed."""
    if requested not in MODEL_PRESETS:
        raise ServeError(f"unknown models preset {requested!r}; choose one of {', '.join(MODEL_PRESETS)}")
    if requested == "toy" and not _toy_models_installed():
        return "tiny", TINY_FALLBACK_NOTE
    return requested, ""


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


class ServeApp:
    """Handlers plus the warm segmenters, keyed by (method, models, options)."""

    def __init__(self, config: ServeConfig | None = None) -> None:
        self.config = config or ServeConfig()
        offered = list(self.config.methods or ovss.list_methods())
        self.methods = sorted(offered, key=lambda m: m != DEFAULT_METHOD) if self.config.methods is None else offered
        self._warm: OrderedDict[tuple, "Method"] = OrderedDict()
        self._lock = threading.Lock()
        self._owns_work_dir = self.config.work_dir is None
        self.work_dir = Path(self.config.work_dir or tempfile.mkdtemp(prefix="ovss-serve-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._requests: list[Path] = []

    def close(self) -> None:
        """Drop the warm models and delete the download folder if the app created it."""
        self._warm.clear()
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- inputs ------------------------------------------------------------------------------------
    def image(self, upload: bytes | None, scene: str | None) -> Image.Image:
        """The request's image: the upload if there is one, else the named toy scene."""
        if upload:
            return decode_upload(upload, max_bytes=self.config.max_upload_bytes, max_pixels=self.config.max_pixels)
        if scene:
            return toy_scene(scene)
        raise ServeError("no image: upload one or pick a toy scene")

    def segmenter(self, method: str, models: str) -> "Method":
        """The warm segmenter for (method, models, options), built on first use."""
        if method not in self.methods:
            raise ServeError(f"method {method!r} is not offered here; choose from {', '.join(self.methods)}")
        options = self.config.options.get(method, {})
        key = (method, models, self.config.device, self.config.dtype, repr(sorted(options.items())))
        with self._lock:
            if key in self._warm:
                self._warm.move_to_end(key)
                return self._warm[key]
            seg = ovss.create(method, models=None if models == "paper" else models, device=self.config.device,
                              dtype=self.config.dtype, **options)
            self._warm[key] = seg
            while len(self._warm) > max(1, self.config.max_warm):
                self._warm.popitem(last=False)
            return seg

    def is_warm(self, method: str, models: str) -> bool:
        return any(k[0] == method and k[1] == models for k in self._warm)

    # -- the request -------------------------------------------------------------------------------
    def run(self, request: RunRequest, progress: Progress | None = None) -> RunResult:
        """Segment one image with each chosen method; a method that fails is reported in its own view."""
        report = progress or (lambda fraction, message: None)
        methods = list(dict.fromkeys(request.methods))
        if not methods:
            raise ServeError("no method chosen")
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise ServeError(f"method(s) {', '.join(unknown)} not offered here; choose from {', '.join(self.methods)}")
        if request.bg_threshold is not None and not 0.0 <= request.bg_threshold <= 1.0:
            raise ServeError(f"background threshold {request.bg_threshold} is outside [0, 1]")
        classes = parse_classes(request.classes, self.config.max_classes)
        models, note = resolve_models(request.models)
        image = self.image(request.upload, request.toy_scene)
        out_dir = self._request_dir()
        views = []
        steps = 2 * len(methods)
        for i, method in enumerate(methods):
            view = MethodView(method)
            try:
                report(2 * i / steps, f"{method}: loading the {models} models" if not self.is_warm(method, models)
                       else f"{method}: models warm")
                seg = self.segmenter(method, models)
                report((2 * i + 1) / steps, f"{method}: segmenting")
                t0 = time.perf_counter()
                result = seg.segment(image, classes, background=request.background, bg_threshold=request.bg_threshold)
                self._fill(view, image, result, models, time.perf_counter() - t0, out_dir)
            except Exception as err:  # one method failing (missing weights, a bug) must not take the others down
                log.exception("ovss serve: %s failed", method)
                view.error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                view.summary = f"**{method}** failed: {_md_cell(view.error)}"
            views.append(view)
        report(1.0, "done")
        shown = [v for v in views if v.overlay is not None]
        display = image.resize(_display_size(*image.size), Image.Resampling.BICUBIC)
        comparison = (grid([[display] + [v.overlay for v in shown]], ["input"] + [v.method for v in shown])
                      if shown else None)
        return RunResult(image, classes, models, note, views, comparison)

    def _request_dir(self) -> Path:
        """A fresh folder for one request's downloads; the oldest are deleted beyond KEPT_REQUESTS."""
        with self._lock:
            path = Path(tempfile.mkdtemp(prefix="request-", dir=self.work_dir))
            self._requests.append(path)
            while len(self._requests) > KEPT_REQUESTS:
                shutil.rmtree(self._requests.pop(0), ignore_errors=True)
        return path

    def _fill(self, view: MethodView, image: Image.Image, seg: Segmentation, models: str, seconds: float,
              out_dir: Path) -> None:
        view.segmentation = seg
        size = _display_size(*image.size)
        small = image.resize(size, Image.Resampling.BICUBIC)
        labels = _nearest(seg.labels, size)
        view.overlay = overlay(small, labels, seg.classes)
        fractions = seg.fractions()
        for idx in np.unique(seg.labels):
            name = seg.classes[idx]
            mask = Image.fromarray(np.where(labels == idx, 255, 0).astype(np.uint8), "L")
            view.masks.append((mask, f"{name} ({100 * fractions[name]:.1f}%)"))
        fg = [c for c in seg.classes if c != BACKGROUND]  # the user's classes (validate_classes reserves the name)
        scored = [c for c in seg.meta.get("candidates", fg) if c in fg][:MAX_HEATMAPS]
        low = seg.scores_lowres
        lo, hi = min(0.0, float(low.min())), max(1.0, float(low.max()))
        for name in scored:
            heat = heatmap(low[seg.classes.index(name)], lo, hi).resize(size, Image.Resampling.BILINEAR)
            view.heatmaps.append((heat, f"{name} (max {float(low[seg.classes.index(name)].max()):.2f})"))
        stem = sanitize_name(view.method)
        files = save_segmentation(seg, out_dir, stem, image=image, masks=True)
        archive = out_dir / f"{stem}_masks.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for mask_file in sorted(files["masks"].iterdir()):
                zf.write(mask_file, f"{stem}_masks/{mask_file.name}")
        view.files = [files["labels"], files["json"], files["overlay"], archive]
        view.summary = self._summary(view.method, seg, models, seconds, fractions)

    @staticmethod
    def _summary(method: str, seg: Segmentation, models: str, seconds: float, fractions: dict[str, float]) -> str:
        meta = seg.meta
        head = f"**{method}** · models `{models}` · {seconds:.2f} s"
        if meta.get("bg_threshold") is not None:
            head += f" · background threshold {float(meta['bg_threshold']):.2f}"
        lines = [head, ""]
        if meta.get("candidates") is not None:
            lines += [f"candidates: {_md_cell(', '.join(meta['candidates'])) or '(none)'}", ""]
        if meta.get("caption"):
            lines += [f"caption: _{_md_cell(str(meta['caption']))}_", ""]
        lines += ["| class | pixels |", "|---|---|"]
        lines += [f"| {_md_cell(name)} | {100 * f:.1f}% |" for name, f in fractions.items()]
        return "\n".join(lines)
