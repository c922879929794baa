"""`ovss demo`: every method on a few toy-world scenes, offline, in minutes on a CPU.

It is README's main job: it shows a newcomer what each method produces (overlays, a side-by-side grid) and
how well (mIoU next to the trivial baselines), using the shipped toy models. Until those are installed it
falls back to tiny random-weight models and says so: then the output shows the plumbing, not segmentation.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import ovss
from ovss.eval.metrics import ConfusionMatrix
from ovss.io import save_segmentation, write_json
from ovss.models import ModelNotFoundError
from ovss.toy import TOY_THINGS, TOY_THINGS_WITH_BG, iter_scenes
from ovss.viz import grid, overlay

log = logging.getLogger(__name__)

TINY_NOTE = ("NOTE: the toy-world models are not installed, so this demo runs on TINY RANDOM-WEIGHT models: "
             "the numbers and pictures show the pipeline working end to end, not segmentation quality.")


@dataclass
class DemoResult:
    models: str
    rows: list[dict] = field(default_factory=list)  # one per method / baseline: name, miou, seconds
    failures: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"models: `{self.models}`", "", "| method | mIoU (bg + things) | s / image |", "|---|---|---|"]
        for r in self.rows:
            sec = "" if r.get("seconds_per_image") is None else f"{r['seconds_per_image']:.2f}"
            lines.append(f"| {r['name']} | {r['miou']:.1f} | {sec} |")
        lines += [f"| {name} | failed: {why} | |" for name, why in self.failures.items()]
        return "\n".join(lines)


def toy_models_installed() -> bool:
    """True when `models="toy"` can load (the toy world's trained models ship with the package)."""
    try:
        ovss.models.ModelSet("faseg", "toy", device="cpu", dtype="float32")["diffusion"]
    except ModelNotFoundError:
        return False
    return True


def _miou(preds: list[np.ndarray], truths: list[np.ndarray]) -> float:
    cm = ConfusionMatrix(len(TOY_THINGS_WITH_BG))
    for p, t in zip(preds, truths):
        cm.update(p, t)
    return float(cm.summary(list(TOY_THINGS_WITH_BG))["miou"])


def run_demo(out_dir: str | Path, *, models: str | None = None, n: int = 6, size: int = 160,
             methods: list[str] | None = None, device: str | None = None, seed: int = 0) -> DemoResult:
    """Segment `n` toy test scenes with each method over the toy things (stuff = background); write
    OUT/<method>/ outputs, OUT/grid.png (scene | truth | methods), OUT/results.{json,md}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if models is None:
        models = "toy" if toy_models_installed() else "tiny"
    if models == "tiny":
        print(TINY_NOTE)
    scenes = list(iter_scenes("test", n, size=size))
    truths = [s.labels_things.astype(np.int64) for s in scenes]
    result = DemoResult(models)
    columns: list[list] = [[s.image for s in scenes],
                           [overlay(s.image, t, TOY_THINGS_WITH_BG, legend=False) for s, t in zip(scenes, truths)]]
    titles = ["scene", "truth"]
    for name in methods or ovss.list_methods():
        try:
            seg = ovss.create(name, models=models, device=device, seed=seed)
            t0 = time.perf_counter()
            outs = list(seg.segment_many([s.image for s in scenes], classes=list(TOY_THINGS), background=True))
            elapsed = time.perf_counter() - t0
        except (ModelNotFoundError, ValueError, RuntimeError) as err:
            result.failures[name] = str(err).splitlines()[0]
            log.warning("demo: %s failed: %s", name, err)
            continue
        for i, (s, o) in enumerate(zip(scenes, outs)):
            save_segmentation(o, out / name, f"scene{i}", image=s.image)
        result.rows.append({"name": name, "miou": _miou([o.labels for o in outs], truths),
                            "seconds_per_image": elapsed / len(scenes)})
        columns.append([overlay(s.image, o.labels, o.classes, legend=False) for s, o in zip(scenes, outs)])
        titles.append(name)
    # Trivial baselines on the same scenes, so a method's number means something.
    result.rows.append({"name": "baseline: all background", "miou": _miou([np.zeros_like(t) for t in truths], truths)})
    things = np.concatenate([t[t > 0] for t in truths])
    frequent = int(np.bincount(things).argmax()) if things.size else 0
    result.rows.append({"name": f"baseline: all '{TOY_THINGS_WITH_BG[frequent]}'",
                        "miou": _miou([np.full_like(t, frequent) for t in truths], truths)})
    grid([list(r) for r in zip(*columns)], titles).save(out / "grid.png")
    write_json(out / "results.json", {"models": models, "scenes": n, "size": size, "rows": result.rows,
                                      "failures": result.failures})
    (out / "results.md").write_text(result.markdown() + "\n", encoding="utf-8")
    return result
