"""Does a toy diffusion model bind words to regions, and does a method segment with it? Quick numbers.

Two checks on val scenes, both next to what chance / a trivial rule gets:
- `binding_probe`: for each class a scene names, does the peak of its word's cross-attention map (mean of
  the factor-2 and factor-4 maps, read at a low timestep) fall inside that class's region? Chance is the
  region's share of the image.
- `evaluate_method`: a method (FA-Seg by default) on `models`, scored with the confusion-matrix mIoU, with the
  trivial baselines of the same scenes: all-background, the most frequent class, and the *caption prior*
  (the whole image labelled with the stuff word(s) the caption names, split at the horizon when it names two).

    python -m ovss.toy.probe --run unet          # a trained run in .toy_runs (before export)
    python -m ovss.toy.probe --run unet_te --methods diffsegmenter,ovdiff   # ... scored with other methods
    python -m ovss.toy.probe --exported          # the shipped models, models="toy"
    python -m ovss.toy.probe --exported --method-skip 80 --method-n 200   # ... on 200 scenes past the reported
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovss.attention import AttentionCapture
from ovss.diffusion.latents import add_noise, encode_latents, pil_to_tensor, seeded_noise
from ovss.diffusion.text import encode_prompts, tokenize_prompts
from ovss.eval.metrics import ConfusionMatrix
from ovss.toy.scenes import TOY_CLASSES, TOY_STUFF, TOY_THINGS, TOY_THINGS_WITH_BG, Scene, iter_scenes

#: Factors whose cross-attention the binding probe averages (grids 8x8 and 4x4 on 16x16 latents).
PROBE_FACTORS = (2, 4)
#: Low timesteps the probe reads at: DiffSegmenter's t = 100 for the ε model; FA-Seg's t = 1 for the RF model.
PROBE_TIMESTEP = {"eps": 100, "rf": 1}
#: The papers' ablations that the toy world can check (option overrides, each scored beside the default):
#: DiffSegmenter's self-attention refinement (Table 4), FA-Seg's test-time flip and dual prompt (Table 6),
#: OVDiff's extractor ensemble vs SD features alone (Table 2), FreeDA's superpixels (Table 4).
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "diffsegmenter": {"no self-attention refinement": {"self_refine": False}},
    "faseg": {"no test-time flip": {"ttf": False}, "no dual prompt": {"dual_prompt": False}},
    "ovdiff": {"SD features only": {"feature_extractors": ("sd",)}},
    "freeda": {"no superpixels": {"superpixel": "none"}},
}
#: Background thresholds swept for the "best τ" number (tuned on the same scenes: optimistic, labelled so).
TAU_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
#: Stuff from top to bottom of a toy scene: the order the caption prior stacks the stuff it names.
STUFF_TOP_DOWN = ("sky", "wall", "water", "grass", "sand")
SENSES = {"toy": TOY_THINGS_WITH_BG, "toy_full": TOY_CLASSES}
"""toy: background (= all stuff) + things, background scored; toy_full: stuff + things, no background."""
#: Two thing words are *rivals* when a text tower can hardly tell them apart: their class-list prompts
#: ("sky, grass, ⟨thing⟩", the form of FA-Seg's class-only keys) give states (up to the end token) of at least this
#: cosine. The shipped tower has six such pairs, star / triangle at 1.000; a thing beside its rival is where the
#: methods' peaks miss most (docs/toy-world.md).
RIVAL_COSINE = 0.98
RIVAL_CONTEXT = ("sky", "grass")


# ------------------------------------------------------------------------------------------- binding


@torch.no_grad()
def word_maps(dm: Any, scenes: Sequence[Scene], *, objective: str = "eps", timestep: int | None = None,
              prompt: str = "caption", factors: Sequence[int] = PROBE_FACTORS, seed: int = 0, batch: int = 16
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scene and class, the word's cross-attention at image size: ((N, C, H, W) maps, (N, C) named).

    prompt: "caption" (the scene's caption) or "classes" (its tags joined by ", ", FA-Seg's class prompt).
    The latent is the VAE posterior mean, noised to `timestep` with a per-scene seeded draw.
    """
    from ovss.toy.train import ClassTokens

    unet, vae = dm.unet, dm.vae
    t = PROBE_TIMESTEP[objective] if timestep is None else int(timestep)
    finder = ClassTokens(dm.tokenizer)
    size = scenes[0].image.height
    all_maps, all_named = [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        z0 = encode_latents(vae, pil_to_tensor([s.image for s in chunk], size), dm.vae_scale)
        noise = torch.cat([seeded_noise((1, *z0.shape[1:]), seed + s.seed, z0.dtype) for s in chunk])
        if objective == "eps":
            zt = add_noise(z0, noise, float(dm.scheduler.alphas_cumprod[t]))
        else:
            s_ = t / 1000
            zt = s_ * noise + (1 - s_) * z0
        texts = [s.caption if prompt == "caption" else ", ".join(s.tags) for s in chunk]
        ids = tokenize_prompts(dm.tokenizer, texts)
        context = encode_prompts(dm.text_encoder, ids).to(unet.dtype)
        with AttentionCapture(unet, cross=factors) as cap:
            unet(zt.to(unet.dtype), t, encoder_hidden_states=context)
            cross = cap.cross_maps()
        weights = finder.weights(ids)
        total = 0
        for f, maps in cross.items():
            side = int(round(maps.shape[1] ** 0.5))
            m = torch.einsum("bqt,bct->bcq", maps.float(), weights).reshape(len(chunk), -1, side, side)
            m = m / m.flatten(2).sum(-1).clamp_min(1e-12)[..., None, None] * side * side  # mean 1 per map
            total = total + F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
        all_maps.append(total / len(cross))
        all_named.append(weights.sum(-1) > 0)
    return torch.cat(all_maps), torch.cat(all_named)


@torch.no_grad()
def rival_things(dm: Any, threshold: float = RIVAL_COSINE) -> list[tuple[str, str]]:
    """The pairs of thing words whose class-list prompt states in `dm`'s text tower are within `threshold`."""
    texts = [", ".join((*RIVAL_CONTEXT, t)) for t in TOY_THINGS]
    ids = tokenize_prompts(dm.tokenizer, texts)
    states = encode_prompts(dm.text_encoder, ids).float()
    length = len(dm.tokenizer(texts[0]).input_ids)  # every toy thing word is one token: the same length for all
    flat = F.normalize(states[:, :length].flatten(1), dim=1)
    cos = flat @ flat.T
    return [(a, b) for i, a in enumerate(TOY_THINGS) for j, b in enumerate(TOY_THINGS)
            if i < j and cos[i, j] >= threshold]


def binding_probe(dm: Any, scenes: Sequence[Scene], **kwargs) -> dict[str, float]:
    """Share of named (scene, class) pairs whose word-map peak lies inside the class; chance = region share."""
    maps, named = word_maps(dm, scenes, **kwargs)
    pairs = [(s, TOY_CLASSES[int(c)], maps[n, int(c)]) for n, s in enumerate(scenes)
             for c in np.nonzero(named[n].numpy())[0]]
    return {"n_scenes": len(scenes), **peak_hits(pairs)}


def _peak_sites(pairs: Sequence[tuple[Scene, str, Any]]) -> Iterator[tuple[Scene, str, np.ndarray, str | None]]:
    """(scene, class, its region, the class under its map's peak; None for a flat map) for the present classes."""
    for scene, name, m in pairs:
        region = scene.labels_full == TOY_CLASSES.index(name)
        if not region.any():
            continue
        m = np.asarray(m, dtype=np.float32)
        at = TOY_CLASSES[int(scene.labels_full.flat[int(m.argmax())])] if m.max() > m.min() else None
        yield scene, name, region, at


def peak_hits(pairs: Sequence[tuple[Scene, str, Any]],
              rivals: Sequence[tuple[str, str]] | None = None) -> dict[str, float]:
    """For (scene, class, map at the scene's size) triples: the share whose map peaks inside the class's
    region, for things and stuff apart, with chance (the region's mean share of the image) and counts.
    Classes absent from the scene are skipped. For things, also where the peaks land (in another thing, in
    stuff) and the hit rate by company: alone (no other thing class in the scene), beside others; with
    `rivals` (pairs of thing words, `rival_things`), beside others splits into beside a rival / others only."""
    hits: dict[str, list[bool]] = {"things": [], "stuff": []}
    chance: dict[str, list[float]] = {"things": [], "stuff": []}
    landed: dict[str, list[bool]] = {"things_in_another_thing": [], "things_in_stuff": []}
    company: dict[str, list[bool]] = {}
    rival_sets = {frozenset(r) for r in rivals or ()}
    for scene, name, region, at in _peak_sites(pairs):
        group = "stuff" if name in TOY_STUFF else "things"
        hit = at == name
        hits[group].append(hit)
        chance[group].append(float(region.mean()))
        if group == "stuff":
            continue
        landed["things_in_another_thing"].append(at in TOY_THINGS and at != name)
        landed["things_in_stuff"].append(at in TOY_STUFF)
        others = {TOY_CLASSES[int(k)] for k in np.unique(scene.labels_full)} & set(TOY_THINGS) - {name}
        key = ("things_alone" if not others else
               "things_beside_others" if rivals is None else
               "things_beside_a_rival" if any(frozenset((name, o)) in rival_sets for o in others) else
               "things_beside_others_only")
        company.setdefault(key, []).append(hit)
    out: dict[str, float] = {}
    for g in hits:
        out[g] = float(np.mean(hits[g])) if hits[g] else float("nan")
        out[g + "_chance"] = float(np.mean(chance[g])) if chance[g] else float("nan")
        out["n_" + g] = len(hits[g])
    for k, v in {**landed, **company}.items():
        out[k] = float(np.mean(v)) if v else float("nan")
    for k, v in company.items():
        out["n_" + k] = len(v)
    return out


def peak_misses(pairs: Sequence[tuple[Scene, str, Any]]) -> dict[str, int]:
    """For the things of (scene, class, map) triples whose map peaks outside them: "thing -> where" counts,
    where = the class under the peak (another thing, or a stuff), most frequent first. Flat maps are skipped."""
    counts: dict[str, int] = {}
    for _, name, _, at in _peak_sites(pairs):
        if name not in TOY_STUFF and at is not None and at != name:
            counts[f"{name} -> {at}"] = counts.get(f"{name} -> {at}", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ------------------------------------------------------------------------------------------ baselines


def caption_prior(caption: str, size: tuple[int, int], sense: str = "toy_full") -> np.ndarray:
    """The whole image labelled with the stuff the caption names, stacked top to bottom in equal bands
    (split at the horizon when it names two). In the `toy` sense every stuff is background: all zeros."""
    h, w = size
    if sense == "toy":
        return np.zeros((h, w), dtype=np.int64)
    words = set(caption.replace(",", " ").split())
    named = [s for s in STUFF_TOP_DOWN if s in words]
    out = np.zeros((h, w), dtype=np.int64)
    if not named:
        return out
    rows = np.arange(h) * len(named) // h
    for band, name in enumerate(named):
        out[rows == band] = TOY_CLASSES.index(name)
    return out


def gt_labels(scene: Scene, sense: str) -> np.ndarray:
    return (scene.labels_things if sense == "toy" else scene.labels_full).astype(np.int64)


def miou(pairs: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int) -> float:
    """mIoU in percent over the classes present in prediction or truth, one matrix for all images."""
    cm = ConfusionMatrix(num_classes)
    for pred, gt in pairs:
        cm.update(pred, gt)
    return float(np.nanmean(cm.iou()) * 100)


def baselines(scenes: Sequence[Scene], sense: str = "toy") -> dict[str, float]:
    """mIoU of the trivial rules on these scenes: all-background (toy), most frequent class, caption prior."""
    names = SENSES[sense]
    gts = [gt_labels(s, sense) for s in scenes]
    top = int(np.bincount(np.concatenate([g.ravel() for g in gts]), minlength=len(names)).argmax())
    out = {}
    if sense == "toy":
        out["all_background"] = miou([(np.zeros_like(g), g) for g in gts], len(names))
    out[f"most_frequent ({names[top]})"] = miou([(np.full_like(g, top), g) for g in gts], len(names))
    out["caption_prior"] = miou([(caption_prior(s.caption, g.shape, sense), g) for s, g in zip(scenes, gts)],
                                len(names))
    return out


# ------------------------------------------------------------------------------------------- methods


def evaluate_method(method: str, scenes: Sequence[Scene], *, sense: str = "toy", models: Any = "toy",
                    candidates: str = "given", use_captions: bool = True, taus: Sequence[float] = TAU_GRID,
                    rivals: Sequence[tuple[str, str]] | None = None, **config: Any) -> dict[str, Any]:
    """mIoU of `method` on the scenes (with background in the `toy` sense) at its τ and at the best τ of
    `taus` (re-thresholding its scores), plus the baselines. candidates: "given" (the classes present,
    from the ground truth) or "all" (the full vocabulary). use_captions: pass the scene captions (else the
    method captions with its BLIP). rivals: thing pairs the peaks are also broken down by (`peak_hits`)."""
    import dataclasses

    import ovss
    from ovss.registry import get_method_class

    vocab = list(TOY_THINGS if sense == "toy" else TOY_CLASSES)
    background = sense == "toy"
    fields = {f.name for f in dataclasses.fields(get_method_class(method).Config)}
    use_captions = use_captions and "caption" in fields
    if use_captions:
        config.setdefault("caption", "given")
    if "candidates" in fields:  # OVDiff and FreeDA have no candidate stage: `given` alone restricts them
        config["candidates"] = candidates
    seg = ovss.create(method, models=models, **config)
    given = ([[c for c in s.tags if c in vocab] for s in scenes] if candidates == "given" else None)
    results = list(seg.segment_many([s.image for s in scenes], vocab, background=background, given=given,
                                    captions=[s.caption for s in scenes] if use_captions else None))
    gts = [gt_labels(s, sense) for s in scenes]
    n = len(SENSES[sense])
    out: dict[str, Any] = {"method": method, "sense": sense, "candidates": candidates, "n_scenes": len(scenes),
                           "miou": miou([(r.labels, g) for r, g in zip(results, gts)], n)}
    # The issue's binding target, on the method's own per-class score maps: does each present class's map
    # peak inside its object? (With own candidates, a class the method did not propose has a flat map: a miss.)
    scores = [r.scores for r in results]  # upsampled to the image on each access: once per result
    present = [(s, c, sc[r.classes.index(c)]) for s, r, sc in zip(scenes, results, scores)
               for c in s.tags if c in r.classes and c != "background"]
    out["peaks"] = peak_hits(present, rivals)
    out["peak_misses"] = peak_misses(present)
    if background:
        out["tau"] = results[0].meta.get("bg_threshold")
    # Re-thresholding needs τ semantics (max score ≥ τ is a class); OVDiff decides background by prototypes.
    if background and taus and out["tau"] is not None and "candidates" in results[0].meta:
        best = [_best_candidate(r, sc) for r, sc in zip(results, scores)]
        sweep = {tau: miou([(torch.where(b >= tau, i, 0).numpy(), g) for (b, i), g in zip(best, gts)], n)
                 for tau in taus}
        out["best_tau"] = max(sweep, key=sweep.get)
        out["best_miou"] = sweep[out["best_tau"]]
    out["baselines"] = baselines(scenes, sense)
    return out


def _best_candidate(result: Any, scores: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(best score, its label) per pixel over a with-background result's candidate classes, so that its labels
    at any τ are `where(best >= τ, label, 0)` (the methods' rule: max ≥ τ is a class). No candidate: −inf."""
    allowed = torch.tensor([c in result.meta.get("candidates", []) for c in result.classes[1:]])
    best, idx = torch.from_numpy(scores)[1:].masked_fill(~allowed[:, None, None], float("-inf")).max(0)
    return best, idx + 1


# ------------------------------------------------------------------------------------------------ CLI


def _run_models(out: Path, run: str) -> tuple[Any, Path]:
    """A trained UNet run as DiffusionModels, via a (fp32) folder written next to it in the hub layout."""
    from ovss.models.loading import load_component
    from ovss.toy.export import write_diffusion_folder

    folder = write_diffusion_folder(out, run, out / run / "folder", dtype=torch.float32)
    return load_component("diffusion", str(folder)), folder


#: Methods that read a UNet run at test time (FreeDA reads a bank built from one: `train bank` first).
RUN_METHODS = {"rf": ("faseg",), "eps": ("diffsegmenter", "ovdiff")}


def run_method_setup(method: str, folder: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """(models, config) that score `method` on a UNet run's folder as on `models="toy"`: the other roles from
    the shipped toy models, and the toy geometry (TOY_CONFIG), which a models dict does not bring by itself."""
    from ovss.models.presets import PRESETS, TOY_CONFIG

    return {**{role: "toy" for role in PRESETS[method]}, "diffusion": str(folder)}, dict(TOY_CONFIG.get(method, {}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ovss.toy.probe", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a UNet run in --out (unet, rf_unet, unet_noaux, ...), probed with FA-Seg")
    src.add_argument("--exported", action="store_true", help="the shipped toy models (models='toy')")
    p.add_argument("--out", default=".toy_runs")
    p.add_argument("--n", type=int, default=100, help="val scenes for the binding probe")
    p.add_argument("--method-n", type=int, default=50, help="val scenes for the method mIoU")
    p.add_argument("--method-skip", type=int, default=0,
                   help="score the methods on val scenes K.. instead of 0.. (e.g. 80: past the reported scenes "
                        "0-49 and the held-out scenes 50-79 that calibrated the toy presets)")
    p.add_argument("--methods", help="comma-separated methods to score (default: faseg; for --run, the methods "
                   "that read its objective's UNet: faseg for rf, diffsegmenter,ovdiff for eps)")
    p.add_argument("--default-candidates", action="store_true",
                   help="--exported: also score each method with its own candidate stage and captions")
    p.add_argument("--ablations", action="store_true",
                   help="--exported: also score the papers' ablations (ABLATIONS) with given candidates")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    scenes = list(iter_scenes("val", max(a.n, a.method_skip + a.method_n)))
    method_scenes = scenes[a.method_skip:a.method_skip + a.method_n]
    from ovss.models.presets import TOY_PRESETS

    if a.exported:
        from ovss.models.loading import load_component

        runs = {"diffusion": ("eps", "toy"), "diffusion_rf": ("rf", "toy")}
        methods = (a.methods or "faseg").split(",")
        name = "exported"
    else:
        meta = json.loads((out / a.run / "meta.json").read_text())
        runs = {a.run: (meta["objective"], None)}
        serves = RUN_METHODS[meta["objective"]]
        methods = a.methods.split(",") if a.methods else list(serves)
        if wrong := [m for m in methods if m not in serves]:
            p.error(f"--run {a.run} is a {meta['objective']} UNet: it serves {', '.join(serves)}, "
                    f"not {', '.join(wrong)}")
        name = a.run
    report: dict[str, Any] = {"run": name, "method_scenes": [a.method_skip, a.method_skip + len(method_scenes)],
                              "rivals": {}, "binding": {}, "methods": {}}
    if a.method_skip:  # another scene range: a report of its own, beside the one the model cards read
        name += f"_val{a.method_skip}-{a.method_skip + len(method_scenes) - 1}"
    folder: Path | None = None
    for run, (objective, _) in runs.items():
        if a.exported:
            dm = load_component("diffusion", "toy", role=run)
        else:
            dm, folder = _run_models(out, run)
        report["rivals"][run] = rival_things(dm)
        print("rivals", run, json.dumps(report["rivals"][run]), flush=True)
        for prompt in ("caption", "classes"):
            key = prompt if not a.exported else f"{run}, {prompt}"
            report["binding"][key] = binding_probe(dm, scenes[:a.n], objective=objective, prompt=prompt)
            print("binding", key, json.dumps(report["binding"][key]), flush=True)
    for method in methods:
        variants: list[tuple[str, dict]] = [("given candidates", dict(candidates="given"))]
        if a.exported and a.default_candidates and _default_candidates(method) is not None:
            variants.append(("own candidates", dict(candidates=None, use_captions=False)))
        if a.exported and a.ablations:
            variants += [(f"given candidates, {label}", dict(candidates="given", config=cfg))
                         for label, cfg in ABLATIONS.get(method, {}).items()]
        models, toy_config = run_method_setup(method, folder) if folder is not None else ("toy", {})
        rivals = report["rivals"][TOY_PRESETS[method]["diffusion"] if a.exported else a.run]
        for label, kw in variants:
            for sense in ("toy", "toy_full"):
                cand = kw.get("candidates") or _default_candidates(method)
                r = evaluate_method(method, method_scenes, sense=sense, models=models, candidates=cand,
                                    use_captions=kw.get("use_captions", True), rivals=rivals,
                                    **{**toy_config, **kw.get("config", {})})
                report["methods"][f"{method}, {sense}, {label}"] = r
                print(method, sense, label, json.dumps(r), flush=True)
    (out / "probe").mkdir(parents=True, exist_ok=True)
    (out / "probe" / f"{name}.json").write_text(json.dumps(report, indent=2))


def _default_candidates(method: str) -> str | None:
    """The method's own candidate stage, None for methods without one (OVDiff, FreeDA)."""
    import dataclasses

    from ovss.registry import get_method_class

    return next((f.default for f in dataclasses.fields(get_method_class(method).Config) if f.name == "candidates"),
                None)


if __name__ == "__main__":
    main()
