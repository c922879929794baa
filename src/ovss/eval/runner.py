"""`ovss eval`: score any registered method on a benchmark under a named protocol, resumably.

A number is only meaningful with its dataset, split, protocol, class names, candidate lists and threshold
(evaluation.md), so every one of them is resolved before a model loads, fingerprinted (with the
method's full config) into OUT/run.json and written into results.json. Predictions are cached per image
as label PNGs (atomic writes), so a killed run continues where it stopped and a finished one re-scores
from the cache; cached predictions from a run with other settings are refused rather than mixed in. A
missing prediction is an error, never a skip (the original evaluators skip silently, evaluation.md §3).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import ovss
from ovss.data.datasets import Sample, SegDataset, get_dataset, list_datasets, read_label_png
from ovss.data.names import BACKGROUND, DATASET_CLASSES, NAME_SETS, rename
from ovss.data.toy import TOY_DATASETS, TOY_DEFAULT_SIZE
from ovss.dense.labels import labels_with_background, labels_without_background, resize_labels, resize_scores
from ovss.dense.windows import slide_inference
from ovss.eval.metrics import ConfusionMatrix, per_image_miou
from ovss.eval.protocols import PROTOCOLS, Protocol, get_protocol
from ovss.eval.reports import markdown_report, qualitative_grid, read_json, software_versions
from ovss.io import atomic_write, label_image, write_json
from ovss.registry import get_method_class

#: Sweep scores are cached as uint16 counts of 1e-4 grid steps: exact for any τ on that grid
#: (DiffSegmenter's 0.30:0.74:0.01 included); the official script kept only 1/255 (maps saved x255).
SWEEP_SCORE_STEP = 1e-4
_STEPS_PER_UNIT = 10_000  # 1 / SWEEP_SCORE_STEP, as an exact integer
_Q_MAX = int(np.iinfo(np.uint16).max)
#: Grid cells are shrunk to this long side so that a grid of Cityscapes images stays viewable.
GRID_MAX_SIDE = 384

T = TypeVar("T")
U = TypeVar("U")


class EvalConfigError(ValueError):
    """A run that cannot start: unknown key, protocol/dataset mismatch, bad candidates file, foreign cache."""


class ModelLoadError(RuntimeError):
    """The method's models could not be loaded."""


@dataclass
class EvalConfig:
    """One evaluation run. None fields take the documented defaults.

    protocol: None -> the method class's `paper_protocol` if it declares one, else "tcl".
    classes: names replacing the dataset's, in label order (background datasets: the foreground names
    only; "background" stays label 0); classes_file records where they came from. name_set: a named
    spelling from ovss.data.names (default: the method class's `name_set` attribute, if it covers the
    dataset). seed: passed to the method's Config when it has a seed field. workers: loader threads (0 =
    load in the calling thread). size: image side of the generated toy benchmark.
    """

    method: str
    dataset: str
    out_dir: str | Path
    data_root: str | Path | None = None
    protocol: str | None = None
    split: str | None = None
    limit: int | None = None
    models: None | str | dict[str, str] = None
    device: str | None = None
    dtype: str | None = None
    batch_size: int | None = None
    workers: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None
    classes_file: str | None = None
    name_set: str | None = None
    candidates_file: str | None = None
    sweep_threshold: tuple[float, float, float] | None = None
    grid: int = 8
    seed: int | None = None
    size: int | None = None


# -- small parsers ------------------------------------------------------------------------------------


def parse_sweep(text: str) -> tuple[float, float, float]:
    """"0.30:0.74:0.01" -> (0.30, 0.74, 0.01)."""
    parts = text.split(":")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"threshold sweep {text!r}: expected START:STOP:STEP, e.g. 0.30:0.74:0.01") from None
    if not (step > 0 and start <= stop):
        raise ValueError(f"threshold sweep {text!r}: need STEP > 0 and START <= STOP")
    return start, stop, step


def sweep_values(spec: tuple[float, float, float]) -> list[float]:
    """Every τ from start to stop inclusive (0.30:0.74:0.01 -> 45 values), on the cache's 1e-4 grid."""
    start, stop, step = spec
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    taus = [round(start + i * step, 10) for i in range(n)]
    for tau in taus:
        units = tau * _STEPS_PER_UNIT
        if abs(units - round(units)) > 1e-6 or not 0 <= round(units) < _Q_MAX:
            raise ValueError(f"threshold {tau} is not a multiple of {SWEEP_SCORE_STEP} in [0, "
                             f"{(_Q_MAX - 1) * SWEEP_SCORE_STEP:.4f}]: the cached scores cannot decide it exactly")
    return taus


def _tau_units(tau: float) -> int:
    return int(round(tau * _STEPS_PER_UNIT))


def quantise_scores(best: np.ndarray) -> np.ndarray:
    """Best foreground score per pixel -> uint16 q = how many grid thresholds T·1e-4 lie below it in float32.

    Then q > T exactly when float32(score) > float32(τ), the comparison a method makes on its float32 maps
    (ties go to background). score·10000 is exact in float64 (24 + 14 mantissa bits), so the floor is too.
    """
    s = np.asarray(best, dtype=np.float32)
    c = np.clip(np.floor(s.astype(np.float64) * _STEPS_PER_UNIT), 0, _Q_MAX)
    q = c + ((c / _STEPS_PER_UNIT).astype(np.float32) < s)
    return np.minimum(q, _Q_MAX).astype(np.uint16)


def labels_at(q: np.ndarray, cls: np.ndarray, tau: float) -> np.ndarray:
    """The candidate/tcl background rule on cached scores: best class iff its score > τ, else background."""
    return np.where(q > _tau_units(tau), cls.astype(np.int64) + 1, 0)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- candidate lists ----------------------------------------------------------------------------------

_COCO_2014_PREFIX = re.compile(r"^COCO_(?:train|val)2014_")


def _image_key(key: str) -> str:
    """A file's entry -> a sample id: basename without extension; COCO's val2014-style names -> val2017 ids."""
    stem = Path(key.replace("\\", "/")).name
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    return _COCO_2014_PREFIX.sub("", stem)


def _spellings(dataset: str, names: list[str], canonical: tuple[str, ...]) -> dict[str, int | None]:
    """Every accepted spelling of every foreground class -> its label (None when two classes share it)."""
    variants = [list(canonical), names]
    for ns in NAME_SETS:
        try:
            variants.append(rename(list(canonical), dataset, ns))
        except ValueError:  # this name set does not cover the dataset
            pass
    table: dict[str, int | None] = {}
    for variant in variants:
        for label, name in enumerate(variant):
            if name == BACKGROUND:
                continue
            key = " ".join(name.lower().split())
            table[key] = label if table.get(key, label) == label else None
    return table


def _parse_names(value: Any, table: dict[str, int | None], where: str) -> list[int]:
    """A list of names, or FA-Seg's space-separated string parsed by longest match."""
    if isinstance(value, str):
        words = value.replace(",", " ").lower().split()
        labels, i = [], 0
        while i < len(words):
            for j in range(len(words), i, -1):
                if " ".join(words[i:j]) in table:
                    labels.append(_lookup(table, " ".join(words[i:j]), where))
                    i = j
                    break
            else:
                raise EvalConfigError(f"{where}: {words[i]!r} (in {value!r}) is not a class name of this dataset")
        return labels
    if not isinstance(value, list):
        raise EvalConfigError(f"{where}: expected a list of class names or a string, got {type(value).__name__}")
    labels = []
    for name in value:
        key = " ".join(str(name).lower().split())
        if key not in table:
            raise EvalConfigError(f"{where}: {name!r} is not a class name of this dataset")
        labels.append(_lookup(table, key, where))
    return labels


def _lookup(table: dict[str, int | None], key: str, where: str) -> int:
    label = table[key]
    if label is None:
        raise EvalConfigError(f"{where}: {key!r} names two classes in different spellings; fix the file")
    return label


def load_candidates(path: str | Path, dataset: str, ids: list[str], names: list[str],
                    canonical: tuple[str, ...]) -> tuple[dict[str, list[str]], str]:
    """Per-image candidate lists from a JSON file, as names of the class list in use.

    Formats: {image: [names]}; FA-Seg's {image: "space separated names"}; DiffSegmenter's
    {"image_similarity": {...}, "text_similarity": {...}, ...} (the union of those two, as its scripts use).
    Image keys may be ids, file names or paths. Names may be in the dataset's or any named spelling. Every
    image of the split must have an entry (an empty list means all background).
    """
    try:
        data = read_json(path, "candidates file")
    except ValueError as err:
        raise EvalConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise EvalConfigError(f"candidates file {path}: expected a JSON object keyed by image")
    parts = [data[k] for k in ("image_similarity", "text_similarity") if isinstance(data.get(k), dict)]
    fmt = "union of image_similarity and text_similarity (DiffSegmenter)" if parts else "per-image lists"
    if not parts:
        parts = [data]
    table = _spellings(dataset, names, canonical)
    wanted = set(ids)
    found: dict[str, list[int]] = {}
    for part in parts:
        seen: set[str] = set()
        for key, value in part.items():
            image = _image_key(str(key))
            if image not in wanted:
                continue
            if image in seen:
                raise EvalConfigError(f"candidates file {path}: two entries for image {image!r}")
            seen.add(image)
            labels = found.setdefault(image, [])
            labels += [lab for lab in _parse_names(value, table, f"{path} [{key}]") if lab not in labels]
    missing = [i for i in ids if i not in found]
    if missing:
        raise EvalConfigError(f"candidates file {path} has no entry for {len(missing)} of {len(ids)} images, "
                              f"e.g. {', '.join(missing[:5])}")
    return {i: [names[lab] for lab in found[i]] for i in ids}, fmt


# -- the plan: everything checked before a model loads --------------------------------------------------


@dataclass
class _Plan:
    dataset: SegDataset
    protocol: Protocol
    names: list[str]
    classes_source: str
    background: bool
    candidates: dict[str, list[str]] | None
    candidates_info: dict[str, Any]
    taus: list[float] | None
    windows: bool  # score_crop + sliding windows, else the method's segment()
    background_scored: bool  # score_crop returns a background channel itself
    method_options: dict[str, Any]
    settings: dict[str, Any]  # what the cached predictions depend on, besides the method's config and models
    own_geometry: bool = False  # the method applies this protocol's resize and windows itself: give it the original

    @property
    def foreground(self) -> list[str]:
        return self.names[1:] if self.background else self.names


def _canonical_names(key: str) -> tuple[str, ...]:
    return TOY_DATASETS[key].names if key in TOY_DATASETS else DATASET_CLASSES[key]


def _resolve_protocol(name: str, key: str, method_cls: type) -> Protocol:
    declared = getattr(method_cls, "paper_protocol", None)
    try:
        if key not in TOY_DATASETS:
            return get_protocol(name, key)
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; available: {', '.join(PROTOCOLS)}")
        proto = PROTOCOLS[name]
        if proto.datasets is not None and not TOY_DATASETS[key].has_background:
            raise ValueError(f"protocol {name!r} always scores background; use dataset 'toy', not {key!r}")
        return proto
    except ValueError as err:
        hint = (f" ({getattr(method_cls, 'name', method_cls.__name__)}'s paper protocol is {declared!r}; choose another with --protocol)"
                if declared == name else "")
        raise EvalConfigError(f"{err}{hint}") from None


def _resolve_names(cfg: EvalConfig, method_cls: type) -> tuple[list[str] | None, str]:
    """(names replacing the dataset's or None, where the names come from)."""
    key = cfg.dataset
    canonical = _canonical_names(key)
    background = canonical[0] == BACKGROUND
    if cfg.classes is not None:
        names = ([BACKGROUND] if background else []) + list(cfg.classes)
        if len(names) != len(canonical):
            want = len(canonical) - background
            raise EvalConfigError(f"{key}: {len(cfg.classes)} class names given, the labels need {want}"
                                  + (" (foreground only: background is label 0)" if background else ""))
        return names, f"classes file {cfg.classes_file}" if cfg.classes_file else "given list"
    name_set = cfg.name_set or getattr(method_cls, "name_set", None)
    if name_set is None:
        return None, "dataset"
    try:
        return rename(list(canonical), key, name_set), f"name set {name_set!r}"
    except ValueError as err:
        if cfg.name_set is not None:
            raise EvalConfigError(str(err)) from None
        return None, f"dataset (the method's name set {name_set!r} does not cover {key})"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _plan(cfg: EvalConfig, method_cls: type) -> _Plan:
    key = cfg.dataset
    known = [*list_datasets(), *TOY_DATASETS]
    if key not in known:
        raise EvalConfigError(f"unknown dataset {key!r}; available: {', '.join(known)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise EvalConfigError(f"limit must be at least 1, got {cfg.limit}")
    if cfg.workers < 0 or cfg.grid < 0:
        raise EvalConfigError("workers and grid must be >= 0")
    proto = _resolve_protocol(cfg.protocol or getattr(method_cls, "paper_protocol", None) or "tcl", key, method_cls)
    names, source = _resolve_names(cfg, method_cls)
    try:
        if key in TOY_DATASETS:
            ds = TOY_DATASETS[key](None, cfg.split, limit=cfg.limit, class_names=names,
                                   size=cfg.size or TOY_DEFAULT_SIZE)
        else:
            if cfg.size is not None:
                raise EvalConfigError("size applies to the generated toy datasets only")
            if cfg.data_root is None:
                raise EvalConfigError(f"{key} needs a data root (the folder holding the dataset; "
                                      "see docs/evaluation.md)")
            ds = get_dataset(key, cfg.data_root, cfg.split, limit=cfg.limit, class_names=names)
    except ValueError as err:
        raise EvalConfigError(str(err)) from None
    ids = [s.id for s in ds.samples]
    bad = [i for i in ids if "/" in i or "\\" in i or i in ("", ".", "..")]
    if bad or len(set(ids)) != len(ids):
        raise EvalConfigError(f"{key}: image ids must be unique file names (got e.g. {bad[:3] or ids[:3]})")

    background = bool(ds.has_background)
    candidates, cand_info = None, {"source": None, "file": None, "sha256": None}
    if proto.vocabulary == "candidates":
        cand_info["source"] = "method"
        if cfg.candidates_file is not None:
            candidates, fmt = load_candidates(cfg.candidates_file, key, ids, ds.class_names, _canonical_names(key))
            cand_info = {"source": "file", "file": str(cfg.candidates_file),
                         "sha256": file_sha256(cfg.candidates_file), "format": fmt,
                         "empty_lists": sum(not v for v in candidates.values())}
    elif cfg.candidates_file is not None:
        raise EvalConfigError(f"--candidates-file applies to the candidates protocol only (this run: {proto.name})")

    own_geometry = method_cls.own_geometry and proto.name == method_cls.paper_protocol
    windows = proto.sliding and not own_geometry and callable(getattr(method_cls, "score_crop", None))
    background_scored = windows and background and bool(getattr(method_cls, "background_scores", False))
    taus = None
    if cfg.sweep_threshold is not None:
        if not background:
            raise EvalConfigError(f"a threshold sweep needs a dataset that scores background; {key} does not")
        if background_scored:
            raise EvalConfigError(f"{cfg.method} scores background itself: there is no threshold to sweep")
        try:
            taus = sweep_values(cfg.sweep_threshold)
        except ValueError as err:
            raise EvalConfigError(str(err)) from None

    options = dict(cfg.method_options)
    fields = {f.name for f in dataclasses.fields(method_cls.Config)} if dataclasses.is_dataclass(
        getattr(method_cls, "Config", None)) else set()
    if cfg.seed is not None and "seed" in fields:
        options.setdefault("seed", cfg.seed)
    settings = _jsonable({
        "method": cfg.method, "dataset": key, "split": ds.split, "size": getattr(ds, "size", None),
        "protocol": proto.to_dict(), "classes": ds.class_names, "candidates_sha256": cand_info["sha256"],
        "inference": "windows" if windows else "segment",
    })
    return _Plan(ds, proto, list(ds.class_names), source, background, candidates, cand_info, taus, windows,
                 background_scored, options, settings, own_geometry)


def _check_cache(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to mix cached predictions of another configuration into this run."""
    manifest = out / "run.json"
    preds = out / "preds"
    has_preds = preds.is_dir() and any(preds.glob("*.png"))
    if has_preds:
        if not manifest.is_file():
            raise EvalConfigError(f"{preds} holds predictions but {manifest} is missing: they cannot be "
                                  "attributed to a configuration. Use another output folder or delete preds/.")
        old = json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint", {})
        diff = []
        for k in sorted({*old, *fingerprint}):
            a, b = old.get(k), fingerprint.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                diff += [f"{k}.{sub}" for sub in sorted({*a, *b}) if a.get(sub) != b.get(sub)]
            elif a != b:
                diff.append(k)
        if diff:
            raise EvalConfigError(f"{out} holds predictions of a run with different {', '.join(diff)}; "
                                  "use another output folder (-o) or delete its preds/ to start over")
    write_json(manifest, {"fingerprint": fingerprint, "ovss_version": ovss.__version__})


# -- data loading -------------------------------------------------------------------------------------


def _prefetch(fn: Callable[[T], U], items: Iterable[T], workers: int) -> Iterator[U]:
    """fn over items in order; with workers > 0, up to 2 * workers items load ahead in threads."""
    if workers <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ovss-eval-load")
    ahead: deque[Future] = deque()
    it = iter(items)
    try:
        for item in it:
            ahead.append(pool.submit(fn, item))
            if len(ahead) >= 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _as_stored(image: Image.Image) -> Image.Image:
    """The pixels as stored, without EXIF: methods apply EXIF orientation, but labels follow the stored pixels."""
    return Image.fromarray(np.array(image.convert("RGB")), "RGB")


@dataclass
class _Item:
    sample: Sample
    gt: np.ndarray
    model_input: Image.Image | None = None
    pred: np.ndarray | None = None
    q: np.ndarray | None = None
    cls: np.ndarray | None = None
    tau: float | None = None


# -- scoring ------------------------------------------------------------------------------------------


class _Scorer:
    """The dataset-level confusion matrix, the per-image means, and one matrix per swept τ."""

    def __init__(self, num_classes: int, ignore_index: int, taus: list[float] | None) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = ConfusionMatrix(num_classes, ignore_index)
        self.per_image: list[float] = []
        self.taus = taus or []
        self.sweep = [ConfusionMatrix(num_classes, ignore_index) for _ in self.taus]
        self.agree = self.pixels = 0

    def add(self, item: _Item) -> None:
        self.cm.update(item.pred, item.gt)
        v = per_image_miou([(item.pred, item.gt)], self.num_classes, self.ignore_index)
        if not math.isnan(v):
            self.per_image.append(v)
        if self.taus:
            for tau, cm in zip(self.taus, self.sweep):
                cm.update(labels_at(item.q, item.cls, tau), item.gt)
            if item.tau is not None:
                self.agree += int((labels_at(item.q, item.cls, item.tau) == item.pred).sum())
                self.pixels += item.pred.size

    def running(self, mean: str) -> float:
        iou = self.cm.iou()
        if mean == "plain":
            return float(np.nan_to_num(iou).mean()) * 100
        return float(np.nanmean(iou)) * 100 if (~np.isnan(iou)).any() else math.nan


# -- the run ------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, cfg: EvalConfig, plan: _Plan, segmenter: Any, out: Path) -> None:
        self.cfg, self.plan, self.segmenter, self.out = cfg, plan, segmenter, out
        self.ds = plan.dataset
        self.preds = out / "preds"
        self.scores = out / "scores"
        self.preds.mkdir(parents=True, exist_ok=True)
        if plan.taus:
            self.scores.mkdir(exist_ok=True)
        self.scorer = _Scorer(self.ds.num_classes, self.ds.ignore_index, plan.taus)
        self.n_predicted = 0

    def pred_path(self, sample: Sample) -> Path:
        return self.preds / f"{sample.id}.png"

    def score_path(self, sample: Sample) -> Path:
        return self.scores / f"{sample.id}.npz"

    def is_cached(self, sample: Sample) -> bool:
        return self.pred_path(sample).is_file() and (not self.plan.taus or self.score_path(sample).is_file())

    # loaders (run in worker threads) -------------------------------------------------------------------
    def load_cached(self, sample: Sample) -> _Item:
        item = _Item(sample, self.ds.load_label(sample))
        path = self.pred_path(sample)
        item.pred = read_label_png(path).astype(np.int64)
        if item.pred.shape != item.gt.shape:
            raise RuntimeError(f"cached prediction {path} is {item.pred.shape} but the ground truth is "
                               f"{item.gt.shape}; delete it and rerun")
        if self.plan.taus:
            with np.load(self.score_path(sample)) as z:
                item.q, item.cls = z["q"], z["cls"]
                item.tau = None if np.isnan(z["tau"]) else float(z["tau"])
        return item

    def load_fresh(self, sample: Sample) -> _Item:
        image = _as_stored(self.ds.load_image(sample))
        proto = self.plan.protocol
        model_input = image if proto.vocabulary == "candidates" or self.plan.own_geometry else proto.prepare(image)
        return _Item(sample, self.ds.load_label(sample), model_input)

    # predictions ---------------------------------------------------------------------------------------
    def finish(self, item: _Item, labels: np.ndarray, fg_scores: torch.Tensor | None, tau: float | None) -> None:
        """Cache one prediction (labels at the ground-truth size) and score it."""
        item.pred = labels.astype(np.int64)
        if item.pred.shape != item.gt.shape:
            raise RuntimeError(f"prediction for {item.sample.id} is {item.pred.shape}, ground truth {item.gt.shape}")
        if self.plan.taus:
            if fg_scores is None or fg_scores.shape[0] == 0:
                best = np.full(item.gt.shape, -np.inf)
                cls = np.zeros(item.gt.shape, dtype=np.uint8)
            else:
                best_t, idx = fg_scores.max(dim=0)
                best, cls = best_t.numpy(), idx.numpy().astype(np.uint8 if fg_scores.shape[0] <= 256 else np.uint16)
            item.q, item.cls, item.tau = quantise_scores(best), cls, tau
            atomic_write(self.score_path(item.sample), lambda f: np.savez_compressed(
                f, q=item.q, cls=item.cls, tau=np.float64(np.nan if tau is None else tau)))
        image = label_image(item.pred, self.ds.num_classes)
        atomic_write(self.pred_path(item.sample), lambda f: image.save(f, format="PNG", optimize=True))
        self.n_predicted += 1

    def predict_windows(self, items: Iterator[_Item]) -> Iterator[_Item]:
        """tcl / sclip / ovdiff with a method that scores crops: the protocol's windows, stitched by mean."""
        plan, proto = self.plan, self.plan.protocol
        fg = plan.foreground
        n_out = len(fg) + plan.background_scored
        tau = self.window_threshold()
        for item in items:
            arr = torch.from_numpy(np.array(item.model_input))
            image = arr.permute(2, 0, 1)

            def score_fn(crop: torch.Tensor) -> torch.Tensor:
                pil = Image.fromarray(np.ascontiguousarray(crop.permute(1, 2, 0).numpy()), "RGB")
                return torch.as_tensor(self.segmenter.score_crop(pil, fg))

            canvas = slide_inference(score_fn, image, proto.crop, proto.stride, n_out,
                                     extra_crops=proto.extra_windows, whole_image=proto.whole_image)
            # Back to the original size on scores, before any decision (trap 5).
            scores = resize_scores(canvas, item.gt.shape)
            if plan.background_scored:
                labels, fg_scores = scores.argmax(dim=0), None
            elif plan.background:
                labels, fg_scores = labels_with_background(scores, tau, ties="background"), scores
            else:
                labels, fg_scores = labels_without_background(scores), None
            self.finish(item, labels.numpy(), fg_scores, tau)
            yield item

    def window_threshold(self) -> float | None:
        if not self.plan.background or self.plan.background_scored:
            return None
        tau = getattr(getattr(self.segmenter, "config", None), "bg_threshold", None)
        if not isinstance(tau, (int, float)):
            raise EvalConfigError(f"{self.cfg.method}: the background channel needs a numeric config "
                                  f"bg_threshold (got {tau!r}); set one with --set bg_threshold=X")
        return float(tau)

    def predict_segment(self, items: Iterator[_Item], todo: list[Sample]) -> Iterator[_Item]:
        """candidates protocol (or a method without score_crop): the method's own segment_many."""
        plan = self.plan
        pending: deque[_Item] = deque()

        def inputs() -> Iterator[Image.Image]:
            for item in items:
                pending.append(item)
                yield item.model_input

        given = None if plan.candidates is None else [plan.candidates[s.id] for s in todo]
        expected = (["background"] if plan.background else []) + plan.foreground
        for seg in self.segmenter.segment_many(inputs(), plan.foreground, batch_size=self.cfg.batch_size,
                                               background=plan.background, given=given):
            if not pending:
                raise RuntimeError(f"{self.cfg.method} returned more segmentations than images")
            item = pending.popleft()
            if seg.labels.shape != (item.model_input.height, item.model_input.width):
                raise RuntimeError(f"{self.cfg.method} returned a {seg.labels.shape} label map for {item.sample.id}, "
                                   f"whose input is {item.model_input.height}x{item.model_input.width}")
            if list(seg.classes) != expected:
                raise RuntimeError(f"{self.cfg.method} returned classes {seg.classes} for {item.sample.id}; "
                                   f"expected {expected}")
            labels = resize_labels(seg.labels, item.gt.shape)
            fg_scores, tau = None, None
            if plan.taus:
                fg_scores = resize_scores(torch.from_numpy(np.asarray(seg.scores_lowres[1:])), item.gt.shape)
                tau = float(seg.scores_lowres[0].flat[0])
            self.finish(item, labels, fg_scores, tau)
            yield item
        if pending or self.n_predicted < len(todo):
            missing = [s.id for s in todo[self.n_predicted:]]
            raise RuntimeError(f"{self.cfg.method} returned no prediction for {len(missing)} image(s), e.g. "
                               f"{', '.join(missing[:5])}: a missing prediction is an error, not a skip")


def _config_dict(segmenter: Any) -> dict[str, Any] | None:
    config = getattr(segmenter, "config", None)
    return _jsonable(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else None


def _model_sources(segmenter: Any) -> dict[str, str] | None:
    sources = getattr(getattr(segmenter, "models", None), "sources", None)
    return dict(sources()) if callable(sources) else None


def _device(segmenter: Any) -> str | None:
    device = getattr(segmenter, "device", None)
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def evaluate(cfg: EvalConfig, segmenter: Any = None) -> dict[str, Any]:
    """Run (or resume) one evaluation; write OUT/results.json, results.md, grid.png and return the results.

    segmenter: an already built method (tests, notebooks); by default built with ovss.create from cfg.
    """
    t_start = time.perf_counter()
    try:
        method_cls = type(segmenter) if segmenter is not None else get_method_class(cfg.method)
    except ValueError as err:
        raise EvalConfigError(str(err)) from None
    plan = _plan(cfg, method_cls)
    t_load = time.perf_counter()
    if segmenter is None:
        try:
            segmenter = ovss.create(cfg.method, models=cfg.models, device=cfg.device, dtype=cfg.dtype,
                                    **plan.method_options)
        except (TypeError, ValueError) as err:
            raise EvalConfigError(str(err)) from None
        except (RuntimeError, OSError) as err:
            raise ModelLoadError(f"could not load the {cfg.method} models: {err}") from err
    load_s = time.perf_counter() - t_load
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_cache(out, {**plan.settings, **_jsonable({
        "config": _config_dict(segmenter), "models": _model_sources(segmenter) or cfg.models,
        "dtype": str(getattr(segmenter, "dtype", cfg.dtype))})})

    run = _Run(cfg, plan, segmenter, out)
    ds = plan.dataset
    cached = [s for s in ds.samples if run.is_cached(s)]
    todo = [s for s in ds.samples if not run.is_cached(s)]
    mean = plan.protocol.mean
    bar = tqdm(total=len(ds), unit="image", desc=f"ovss eval {cfg.method} {cfg.dataset}", file=sys.stderr)
    t_predict = 0.0
    try:
        for item in _prefetch(run.load_cached, cached, cfg.workers):
            run.scorer.add(item)
            bar.update(1)
        bar.set_postfix_str(f"mIoU {run.scorer.running(mean):.2f}")
        if todo:
            t0 = time.perf_counter()
            items = _prefetch(run.load_fresh, todo, cfg.workers)
            stream = run.predict_windows(items) if plan.windows else run.predict_segment(items, todo)
            for item in stream:
                run.scorer.add(item)
                bar.update(1)
                bar.set_postfix_str(f"mIoU {run.scorer.running(mean):.2f}")
            t_predict = time.perf_counter() - t0
    finally:
        bar.close()
    if run.scorer.cm.n_images != len(ds):
        raise RuntimeError(f"{run.scorer.cm.n_images} of {len(ds)} images scored: predictions are missing")

    results = _results(cfg, plan, run, segmenter, {
        "total_s": time.perf_counter() - t_start, "model_load_s": load_s, "predict_s": t_predict,
        "n_predicted": run.n_predicted, "n_cached": len(cached),
        "per_image_s": t_predict / run.n_predicted if run.n_predicted else None})
    write_json(out / "results.json", results)
    report = markdown_report(results)
    atomic_write(out / "results.md", lambda f: f.write(report.encode("utf-8")))
    if cfg.grid:
        _write_grid(run, out / "grid.png", cfg.grid)
    return results


def _results(cfg: EvalConfig, plan: _Plan, run: _Run, segmenter: Any, timing: dict[str, Any]) -> dict[str, Any]:
    proto, ds = plan.protocol, plan.dataset
    summary = run.scorer.cm.summary(plan.names)
    notes = []
    if plan.own_geometry:
        inference = f"segment (the method applies the {proto.name} resize and windows itself)"
    elif proto.sliding and not plan.windows:
        inference = "segment (fallback)"
        notes.append(f"{cfg.method} has no score_crop: segment() ran on the whole {proto.name}-resized image, "
                     "without the protocol's sliding windows; the geometry differs from the protocol's.")
    elif plan.windows:
        inference = "sliding windows (score_crop)"
    else:
        inference = "segment (whole image, the method squashes it)"
    if plan.candidates_info["source"] == "method":
        notes.append("candidate classes came from the method's own candidate stage (no --candidates-file).")
    sweep = None
    if plan.taus:
        by_tau = [cm.summary(plan.names) for cm in run.scorer.sweep]
        key = "miou_plain" if proto.mean == "plain" else "miou"
        values = [s[key] for s in by_tau]
        best = max(range(len(values)), key=lambda i: -math.inf if values[i] is None else values[i])
        agreement = run.scorer.agree / run.scorer.pixels if run.scorer.pixels else None
        sweep = {
            "oracle": True,
            "label": "oracle: τ chosen on the evaluation split itself (DiffSegmenter's protocol), "
                     "not a held-out result",
            "rule": "a pixel takes its best-scoring class when that score exceeds τ, else background "
                    "(ties to background)",
            "thresholds": run.scorer.taus, "miou": [s["miou"] for s in by_tau],
            "miou_plain": [s["miou_plain"] for s in by_tau], "aacc": [s["aacc"] for s in by_tau],
            "best_threshold": run.scorer.taus[best], "best_miou_protocol": values[best], "best": by_tau[best],
            "score_step": SWEEP_SCORE_STEP, "rule_agreement": agreement,
        }
        if agreement is not None and agreement < 0.99:
            notes.append(f"the sweep rule reproduces the method's own labels at its τ on only {agreement:.1%} of "
                         "pixels: this method decides background differently, so the sweep is not its curve.")
    per_image = run.scorer.per_image
    uses_tau = plan.background and not plan.background_scored
    bg_threshold = getattr(getattr(segmenter, "config", None), "bg_threshold", None) if uses_tau else None
    return {
        "miou": summary["miou"], "miou_plain": summary["miou_plain"],
        "miou_protocol": summary["miou_plain"] if proto.mean == "plain" else summary["miou"],
        "mean": proto.mean, "aacc": summary["aacc"], "per_class_iou": summary["per_class_iou"],
        "per_image_miou": float(np.mean(per_image)) if per_image else None,
        "n_images": summary["n_images"], "n_valid_pixels": summary["n_valid_pixels"],
        "dataset": cfg.dataset, "split": ds.split, "limit": cfg.limit, "data_root": (
            None if cfg.data_root is None else str(cfg.data_root)), "size": getattr(ds, "size", None),
        "protocol": proto.to_dict(), "inference": inference,
        "method": cfg.method, "config": _config_dict(segmenter), "method_options": plan.method_options,
        "models": _model_sources(segmenter), "classes": plan.names, "classes_source": plan.classes_source,
        "background": plan.background, "bg_threshold": bg_threshold, "candidates": plan.candidates_info,
        "sweep": sweep, "timing": timing, "software": software_versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": _device(segmenter),
        "seed": cfg.seed, "notes": notes,
    }


def _write_grid(run: _Run, path: Path, n: int) -> None:
    """image | ground truth | prediction for the first n images of the split (from the cache)."""
    examples = []
    for sample in run.ds.samples[:n]:
        examples.append((_as_stored(run.ds.load_image(sample)), run.ds.load_label(sample),
                         read_label_png(run.pred_path(sample)).astype(np.int64)))
    grid = qualitative_grid(examples, run.plan.names, run.ds.ignore_index, GRID_MAX_SIDE)
    atomic_write(path, lambda f: grid.save(f, format="PNG"))


__all__ = ["EvalConfig", "EvalConfigError", "ModelLoadError", "evaluate", "labels_at", "load_candidates",
           "parse_sweep", "quantise_scores", "sweep_values", "SWEEP_SCORE_STEP"]
