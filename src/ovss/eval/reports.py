"""What an evaluation leaves for people: a Markdown report, side-by-side comparisons and a qualitative grid.

Every table names the dataset, split and protocol next to the numbers (evaluation.md trap 13), and the
headline is the protocol's own mean (nanmean for tcl/sclip/ovdiff, plain mean for candidates).
"""
from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import ovss
from ovss import viz
from ovss.dense.labels import resize_labels

#: keys every results.json written by `ovss eval` carries; compare refuses files without them
REQUIRED_KEYS = ("miou", "miou_plain", "aacc", "per_class_iou", "dataset", "protocol", "method")
_PACKAGES = ("torch", "diffusers", "transformers", "numpy", "pillow")
IGNORED = "(ignored)"


def software_versions() -> dict[str, str | None]:
    """Python, ovss and the libraries whose versions can move the numbers."""
    out: dict[str, str | None] = {"python": platform.python_version(), "ovss": ovss.__version__}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def fmt(value: float | None) -> str:
    """A percentage with two decimals (mmseg's rounding of the report), "–" when undefined."""
    return "–" if value is None else f"{value:.2f}"


def headline_label(results: dict[str, Any]) -> str:
    mean = results.get("mean", "nan")
    return "mIoU (plain mean, absent classes count 0)" if mean == "plain" else "mIoU (nanmean over present classes)"


def _protocol_name(results: dict[str, Any]) -> str:
    proto = results.get("protocol")
    return proto.get("name", "?") if isinstance(proto, dict) else str(proto)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(results: dict[str, Any]) -> str:
    """results.md: the setting, the headline, the sweep (labelled as an oracle) and per-class IoU."""
    proto = results.get("protocol") or {}
    timing = results.get("timing") or {}
    cand = results.get("candidates") or {}
    models = results.get("models") or {}
    per_img = timing.get("per_image_s")
    rows = [
        ["dataset / split", f"{results['dataset']} / {results.get('split')}"],
        ["protocol", f"{_protocol_name(results)} — {proto.get('description', '')}".rstrip(" —")],
        ["images", str(results.get("n_images"))],
        [f"**{headline_label(results)}**", f"**{fmt(results.get('miou_protocol'))}**"],
        ["mIoU (nanmean)", fmt(results["miou"])],
        ["mIoU (plain mean)", fmt(results["miou_plain"])],
        ["aAcc", fmt(results["aacc"])],
        ["per-image mIoU (not the benchmark metric)", fmt(results.get("per_image_miou"))],
        ["background threshold", "–" if results.get("bg_threshold") is None else str(results["bg_threshold"])],
        ["class names", str(results.get("classes_source"))],
        ["candidates", "–" if not cand.get("source") else (
            "method's own stage" if cand["source"] == "method"
            else f"{cand.get('file')} (sha256 {str(cand.get('sha256'))[:16]}…, {cand.get('format')})")],
        ["inference", str(results.get("inference"))],
        ["models", ", ".join(f"{k}={v}" for k, v in models.items()) or "–"],
        ["device", str(results.get("device"))],
        ["time", f"{timing.get('total_s', 0):.1f} s total; {timing.get('n_predicted', 0)} predicted"
                 + (f" at {per_img:.3f} s/image" if per_img else "") + f", {timing.get('n_cached', 0)} from cache"],
    ]
    parts = [f"# ovss eval: {results['method']} on {results['dataset']}", "", _table(rows, ["", ""])]
    sweep = results.get("sweep")
    if sweep:
        key = "miou_plain" if results.get("mean") == "plain" else "miou"
        parts += ["", "## Threshold sweep (ORACLE)", "", sweep["label"] + ".", "",
                  f"Best τ = {sweep['best_threshold']:g}: {headline_label(results)} "
                  f"**{fmt(sweep['best_miou_protocol'])}** (oracle).", "",
                  _table([[f"{t:g}", fmt(v)] for t, v in zip(sweep["thresholds"], sweep[key])], ["τ", "mIoU"])]
    parts += ["", "## Per-class IoU", "",
              _table([[name, fmt(v)] for name, v in results["per_class_iou"].items()], ["class", "IoU"])]
    if results.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(parts) + "\n"


def read_json(path: str | Path, what: str) -> Any:
    """A user-named JSON file; anything wrong becomes a one-line ValueError naming `what` and the path."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"the {what} {path} is not valid JSON: {err}") from None


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json written by `ovss eval` (ValueError for anything else)."""
    data = read_json(path, "results file")
    missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path} is not an ovss eval results file (missing {', '.join(missing)})")
    return data


def _labels(paths: Sequence[str | Path]) -> list[str]:
    """Column names: the run folder's name, or the full path where two folders share a name."""
    names = [Path(p).parent.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def compare_markdown(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Side-by-side table: setting, headline numbers, then every class (in first-seen order)."""
    rows = [
        ["method"] + [r["method"] for r in runs],
        ["dataset / split"] + [f"{r['dataset']} / {r.get('split')}" for r in runs],
        ["protocol"] + [_protocol_name(r) for r in runs],
        ["images"] + [str(r.get("n_images")) for r in runs],
        ["**mIoU (protocol's mean)**"] + [f"**{fmt(r.get('miou_protocol'))}**" for r in runs],
        ["mIoU (nanmean)"] + [fmt(r["miou"]) for r in runs],
        ["mIoU (plain mean)"] + [fmt(r["miou_plain"]) for r in runs],
        ["aAcc"] + [fmt(r["aacc"]) for r in runs],
        ["oracle τ sweep best"] + [
            f"{fmt(r['sweep']['best_miou_protocol'])} at τ={r['sweep']['best_threshold']:g}"
            if r.get("sweep") else "–"
            for r in runs],
    ]
    classes: list[str] = []
    for r in runs:
        classes += [c for c in r["per_class_iou"] if c not in classes]
    rows += [[c] + [fmt(r["per_class_iou"].get(c)) for r in runs] for c in classes]
    text = _table(rows, [""] + list(labels))
    settings = {(r["dataset"], _protocol_name(r)) for r in runs}
    if len(settings) > 1:
        text += ("\n\nNote: these runs differ in dataset or protocol "
                 f"({'; '.join(f'{d} under {p}' for d, p in sorted(settings))}); their numbers are not comparable.")
    return text + "\n"


def compare_files(paths: Sequence[str | Path]) -> str:
    return compare_markdown([load_results(p) for p in paths], _labels(paths))


def _fit(image: Image.Image, labels: list[np.ndarray], max_side: int) -> tuple[Image.Image, list[np.ndarray]]:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image, labels
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR), [resize_labels(lab, (size[1], size[0])) for lab in labels]


def qualitative_grid(examples: Sequence[tuple[Image.Image, np.ndarray, np.ndarray]], classes: Sequence[str],
                     ignore_index: int, max_side: int) -> Image.Image:
    """Rows of image | ground truth | prediction overlays; ignored ground-truth pixels get their own colour."""
    names = [*classes, IGNORED]
    rows = []
    for image, gt, pred in examples:
        gt = np.where(gt == ignore_index, len(classes), gt)
        image, (gt, pred) = _fit(image, [gt, pred], max_side)
        rows.append([image, viz.overlay(image, gt, names), viz.overlay(image, pred, names)])
    return viz.grid(rows, ["image", "ground truth", "prediction"])
