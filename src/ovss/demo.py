"""`ovss demo`: every method on a few toy-world scenes, offline, in minutes on a CPU.

It is README's main job: it shows a newcomer what each method produces (overlays, a side-by-side grid) and
how well (mIoU next to the trivial baselines), using the shipped toy models (and FreeDA's toy bank; OVDiff
builds and caches its toy prototypes on first use). Until those are installed it falls back to tiny
random-weight models and says so: then the output shows the plumbing, not segmentation.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


import ovss
from ovss.io import save_segmentation, write_json
from ovss.models import ModelNotFoundError
from ovss.models.loading import TOY_DIR
from ovss.models.presets import TOY_PRESETS
from ovss.registry import get_method_class
from ovss.toy import TOY_CLASSES, iter_scenes
from ovss.toy.probe import baselines, gt_labels, miou
from ovss.viz import grid, overlay

log = logging.getLogger(__name__)

#: the toy benchmark sense the demo shows: every stuff and thing class named, no background
SENSE = "toy_full"
TINY_NOTE = ("NOTE: the toy-world models are not installed, so this demo runs on TINY RANDOM-WEIGHT models: "
             "the numbers and pictures show the pipeline working end to end, not segmentation quality.")


@dataclass
class DemoResult:
    models: str
    rows: list[dict] = field(default_factory=list)  # one per method / baseline: name, miou, seconds
    skipped: dict[str, str] = field(default_factory=dict)  # methods whose models are not available
    failures: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"models: `{self.models}`", "", "| method | mIoU (stuff + things) | s / image |", "|---|---|---|"]
        for r in self.rows:
            sec = "" if r.get("seconds_per_image") is None else f"{r['seconds_per_image']:.2f}"
            lines.append(f"| {r['name']} | {r['miou']:.1f} | {sec} |")
        lines += [f"| {name} | skipped: {why} | |" for name, why in self.skipped.items()]
        lines += [f"| {name} | failed: {why} | |" for name, why in self.failures.items()]
        return "\n".join(lines)


def toy_models_installed() -> bool:
    """True when the toy world's trained models ship with the package (checked on disk, nothing loaded)."""
    return (TOY_DIR / TOY_PRESETS["faseg"]["diffusion"] / "model_index.json").is_file()


def run_demo(out_dir: str | Path, *, models: str | None = None, n: int = 6, size: int = 160,
             methods: list[str] | None = None, device: str | None = None, seed: int | None = None) -> DemoResult:
    """Segment `n` toy test scenes with each method over the whole toy vocabulary (stuff and things, every
    pixel labelled); write OUT/<method>/ outputs, OUT/grid.png (scene | truth | methods, one colour key),
    OUT/results.{json,md}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if models is None:
        models = "toy" if toy_models_installed() else "tiny"
    if models == "tiny":
        print(TINY_NOTE)
    scenes = list(iter_scenes("test", n, size=size))
    truths = [gt_labels(s, SENSE) for s in scenes]
    result = DemoResult(models)
    columns: list[list] = [[s.image for s in scenes],
                           [overlay(s.image, t, TOY_CLASSES, legend=False) for s, t in zip(scenes, truths)]]
    titles = ["scene", "truth"]
    for name in methods or ovss.list_methods():
        try:
            fields = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
        except ValueError as err:  # an unknown method name
            result.failures[name] = str(err).splitlines()[0]
            continue
        try:
            seeded = {"seed": seed} if seed is not None and "seed" in fields else {}
            seg = ovss.create(name, models=models, device=device, **seeded)
        except (ModelNotFoundError, ValueError) as err:  # toy models not trained yet, or no FreeDA bank given
            result.skipped[name] = str(err).splitlines()[0]
            continue
        try:
            t0 = time.perf_counter()
            outs = list(seg.segment_many([s.image for s in scenes], classes=list(TOY_CLASSES), background=False))
            elapsed = time.perf_counter() - t0
        except (ModelNotFoundError, ValueError, RuntimeError) as err:
            result.failures[name] = str(err).splitlines()[0]
            log.warning("demo: %s failed: %s", name, err)
            continue
        for i, (s, o) in enumerate(zip(scenes, outs)):
            save_segmentation(o, out / name, f"scene{i}", image=s.image)
        result.rows.append({"name": name, "miou": miou(list(zip([o.labels for o in outs], truths)), len(TOY_CLASSES)),
                            "seconds_per_image": elapsed / len(scenes)})
        columns.append([overlay(s.image, o.labels, o.classes, legend=False) for s, o in zip(scenes, outs)])
        titles.append(name)
    # Trivial baselines on the same scenes (most frequent class; the caption prior: the stuff the caption names,
    # in horizontal bands), so a method's number means something.
    result.rows += [{"name": f"baseline: {k}", "miou": v} for k, v in baselines(scenes, SENSE).items()]
    grid([list(r) for r in zip(*columns)], titles, legend=TOY_CLASSES).save(out / "grid.png")
    write_json(out / "results.json", {"models": models, "scenes": n, "size": size, "rows": result.rows,
                                      "skipped": result.skipped, "failures": result.failures})
    (out / "results.md").write_text(result.markdown() + "\n", encoding="utf-8")
    return result
