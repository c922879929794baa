"""`ovss eval`: the resumable runner, reports, compare, grids and the toy benchmark, with fake methods whose
predictions the tests can restate (no model), on tiny VOC fixtures and 32-64 px toy scenes."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovss.cli as cli
import ovss.registry as registry
from ovss.data import get_dataset
from ovss.data.names import VOC20, VOC21
from ovss.eval.runner import (
    EvalConfig,
    EvalConfigError,
    evaluate,
    labels_at,
    load_candidates,
    parse_sweep,
    quantise_scores,
    sweep_values,
)
from ovss.methods.base import Method, SegmentRequest
from ovss.models import PRESETS
from ovss.result import Segmentation
from ovss.toy import TOY_CLASSES, TOY_THINGS_WITH_BG, make_scene

PAINTER, WINDOWED = "fake-eval-painter", "fake-eval-windowed"
W, H = 40, 30
IDS = ("2007_000001", "2007_000002", "2007_000003")
#: per image: (ground-truth classes, predicted classes) of the four quadrants
QUADRANTS = {
    "2007_000001": ((0, 12, 15, 0), (0, 12, 8, 0)),
    "2007_000002": ((8, 8, 0, 3), (8, 15, 0, 3)),
    "2007_000003": ((15, 0, 0, 20), (15, 0, 12, 20)),
}


# -- fake methods -------------------------------------------------------------------------------------
def painter_scores(a: np.ndarray, n: int, allowed: list[int] | None = None) -> np.ndarray:
    """Class k (0-based) scores G/255 * max(0, 1 - |R - 12 (k+1)| / 40): the red channel paints a label."""
    r = a[..., 0].astype(np.float32)
    g = a[..., 1].astype(np.float32) / 255
    k = np.arange(1, n + 1, dtype=np.float32)[:, None, None]
    s = np.clip(1 - np.abs(r[None] - 12 * k) / 40, 0, 1) * g[None]
    if allowed is not None:
        keep = np.zeros(n, bool)
        keep[allowed] = True
        s[~keep] = 0
    return s.astype(np.float32)


def painter_labels(a: np.ndarray, n: int, tau: float | None, allowed: list[int] | None = None) -> np.ndarray:
    """The fake's rule restated: best class when its score exceeds τ (ties to background), else 0."""
    s = painter_scores(a, n, allowed)
    if tau is None:
        return s.argmax(0)
    return np.where(s.max(0) > np.float32(tau), s.argmax(0) + 1, 0)


class Painter(Method):
    """A segmenter whose answer a test can predict: `painter_labels` on the image it receives."""

    @dataclass
    class Config:
        bg_threshold: float = 0.5
        seed: int = 0

    roles = ()
    paper_protocol = "candidates"

    def __init__(self, config=None, models=None, *, device=None, dtype=None, fail_after: int | None = None,
                 drop_last: bool = False):
        super().__init__(config or self.Config(), models, device=device, dtype=dtype)
        self.fail_after = fail_after  # raise once this many images have been segmented (a killed run)
        self.drop_last = drop_last  # return one segmentation fewer than images (a lost prediction)
        self.calls = 0
        self.given: list[list[str] | None] = []
        self.sizes: list[tuple[int, int]] = []

    def _segment_batch(self, images: list[Image.Image], request: SegmentRequest) -> list[Segmentation]:
        out = []
        for i, im in enumerate(images):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("simulated crash")
            self.calls += 1
            given = None if request.given is None else request.given[i]
            self.given.append(given)
            self.sizes.append(im.size)
            a = np.asarray(im)
            allowed = None if given is None else [request.classes.index(c) for c in given]
            fg = painter_scores(a, len(request.classes), allowed)
            if request.background:
                tau = self.config.bg_threshold if request.bg_threshold is None else request.bg_threshold
                labels = painter_labels(a, len(request.classes), tau, allowed)
                scores = np.concatenate([np.full((1, *fg.shape[1:]), tau, np.float32), fg])
                classes = ["background", *request.classes]
            else:
                labels, scores, classes = fg.argmax(0), fg, list(request.classes)
            out.append(Segmentation(labels, scores, classes, {"bg_threshold": self.config.bg_threshold}))
        return out[:-1] if self.drop_last else out


class Windowed(Painter):
    """The same scores per crop, so the runner's sliding windows apply (tcl)."""

    paper_protocol = None

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.crops: list[tuple[int, int]] = []

    def score_crop(self, crop: Image.Image, classes: list[str]) -> torch.Tensor:
        self.crops.append(crop.size)
        return torch.from_numpy(painter_scores(np.asarray(crop), len(classes)))


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    for name, cls in ((PAINTER, Painter), (WINDOWED, Windowed)):
        monkeypatch.setitem(PRESETS, name, {})
        registry.register(name)(cls)
    yield
    for name in (PAINTER, WINDOWED):
        registry._REGISTRY.pop(name, None)


# -- a VOC fixture ------------------------------------------------------------------------------------
def quadrants(values, border: bool) -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)
    lab[: H // 2, : W // 2], lab[: H // 2, W // 2:], lab[H // 2:, : W // 2], lab[H // 2:, W // 2:] = values
    if border:  # VOC's 255 object borders
        lab[H // 2, :] = 255
    return lab


@pytest.fixture
def voc(tmp_path) -> Path:
    """Three VOC images: red channel = 12 x the label the painter will predict, green = a random confidence.

    The last image carries an EXIF rotation tag: labels follow the stored pixels, so the runner must not
    let the method rotate it.
    """
    rng = np.random.default_rng(0)
    base = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True)
    for k, i in enumerate(IDS):
        gt_vals, pred_vals = QUADRANTS[i]
        a = np.zeros((H, W, 3), np.uint8)
        a[..., 0] = quadrants(pred_vals, border=False) * 12
        a[..., 1] = rng.integers(60, 256, (H, W))
        exif = Image.Exif()
        if k == 2:
            exif[0x0112] = 6
        Image.fromarray(a).save(base / "JPEGImages" / f"{i}.jpg", quality=100, subsampling=0,
                                                                     exif=exif.tobytes())
        gt = Image.fromarray(quadrants(gt_vals, border=True), "P")
        gt.putpalette([v for c in range(256) for v in (c, c, c)])
        gt.save(base / "SegmentationClass" / f"{i}.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(IDS) + "\n")
    return tmp_path / "data"


def stored_pixels(root: Path, i: str) -> np.ndarray:
    with Image.open(root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{i}.jpg") as im:
        return np.array(im.convert("RGB"))


def voc_gt(root: Path, i: str, reduce_zero: bool = False) -> np.ndarray:
    g = np.array(Image.open(root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{i}.png")).astype(np.int64)
    if reduce_zero:
        g = np.where((g == 0) | (g == 255), 255, g - 1)
    return g


def direct_metric(pairs, c: int) -> dict:
    """evaluation.md §5 restated: one histogram, IoU = diag / (rows + cols - diag), nanmean and plain mean."""
    hist = np.zeros((c, c), np.int64)
    for pred, gt in pairs:
        valid = gt != 255
        hist += np.bincount(c * gt[valid] + pred[valid], minlength=c * c).reshape(c, c)
    diag = np.diag(hist)
    union = hist.sum(0) + hist.sum(1) - diag
    iou = np.where(union > 0, diag / np.maximum(union, 1), np.nan)
    return {"miou": np.nanmean(iou) * 100, "miou_plain": np.nan_to_num(iou).mean() * 100,
            "aacc": diag.sum() / hist.sum() * 100, "iou": [None if np.isnan(v) else v * 100 for v in iou]}


def assert_matches(results: dict, expected: dict, names) -> None:
    assert results["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert results["miou_plain"] == pytest.approx(expected["miou_plain"], abs=1e-9)
    assert results["aacc"] == pytest.approx(expected["aacc"], abs=1e-9)
    assert list(results["per_class_iou"]) == list(names)
    for got, want in zip(results["per_class_iou"].values(), expected["iou"]):
        assert (got is None and want is None) or got == pytest.approx(want, abs=1e-9)


def cfg(root, out, **kw) -> EvalConfig:
    return EvalConfig(data_root=root, out_dir=out, **{"method": PAINTER, "dataset": "voc21", "grid": 0, **kw})


# -- end to end ---------------------------------------------------------------------------------------
def test_voc21_end_to_end_equals_a_direct_computation(voc, tmp_path):
    out = tmp_path / "run"
    painter = Painter()
    res = evaluate(cfg(voc, out, workers=2, grid=2), painter)
    preds = {i: painter_labels(stored_pixels(voc, i), 20, 0.5) for i in IDS}
    assert_matches(res, direct_metric([(preds[i], voc_gt(voc, i)) for i in IDS], 21), VOC21)
    for i in IDS:  # cached label PNGs hold the predictions, at the ground-truth size, unrotated
        assert np.array_equal(np.array(Image.open(out / "preds" / f"{i}.png")), preds[i])
    assert painter.sizes == [(W, H)] * 3 and painter.given == [None] * 3
    # the method's paper protocol is the default; the candidate protocol's headline is the plain mean
    assert res["protocol"]["name"] == "candidates" and res["miou_protocol"] == res["miou_plain"]
    assert res["n_images"] == 3 and res["dataset"] == "voc21" and res["split"] == "val"
    assert res["bg_threshold"] == 0.5 and res["config"]["bg_threshold"] == 0.5
    assert res["candidates"]["source"] == "method" and res["classes_source"] == "dataset"
    assert res["timing"]["n_predicted"] == 3 and res["timing"]["n_cached"] == 0
    assert {"python", "torch", "diffusers", "transformers", "ovss"} <= set(res["software"])
    per_image = [np.nanmean([v for v in direct_metric([(preds[i], voc_gt(voc, i))], 21)["iou"] if v is not None])
                 for i in IDS]
    assert res["per_image_miou"] == pytest.approx(np.mean(per_image))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["per_class_iou"] == res["per_class_iou"] and on_disk["miou"] == res["miou"]
    md = (out / "results.md").read_text()
    assert f"**{res['miou_plain']:.2f}**" in md and "candidates" in md and "| diningtable |" in md
    with Image.open(out / "grid.png") as g:  # 2 rows of image | truth | prediction
        assert g.width >= 3 * W and g.height >= 2 * H


def test_tcl_sliding_windows_on_voc20(voc, tmp_path):
    win = Windowed()
    res = evaluate(cfg(voc, tmp_path / "run", dataset="voc20", method=WINDOWED), win)
    assert res["protocol"]["name"] == "tcl" and res["inference"].startswith("sliding windows")
    # 40x30 -> short side 448: 597x448, two 448-wide windows at stride 224
    assert win.crops == [(448, 448)] * 6 and win.calls == 0
    pairs = []
    for i in IDS:
        x = torch.from_numpy(stored_pixels(voc, i)).permute(2, 0, 1)[None].float()
        prepared = F.interpolate(x, size=(448, 597), mode="bilinear", align_corners=False).round().clamp(0, 255)
        scores = torch.from_numpy(painter_scores(prepared[0].permute(1, 2, 0).to(torch.uint8).numpy(), 20))
        back = F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        pairs.append((back.argmax(0).numpy(), voc_gt(voc, i, reduce_zero=True)))
    assert_matches(res, direct_metric(pairs, 20), VOC20)
    assert res["miou_protocol"] == res["miou"] and res["bg_threshold"] is None


class BackgroundScorer(Windowed):
    """Scores background itself (like OVDiff's background prototypes): channel 0 = 0.3 everywhere."""

    background_scores = True

    def score_crop(self, crop: Image.Image, classes: list[str]) -> torch.Tensor:
        fg = super().score_crop(crop, classes)
        return torch.cat([torch.full((1, *fg.shape[1:]), 0.3), fg])


@pytest.mark.parametrize("cls", [Windowed, BackgroundScorer])
def test_windows_with_background_on_voc21(voc, tmp_path, cls):
    """τ prepended as a constant channel (ties to background), or the method's own background channel."""
    sweep = (0.3, 0.5, 0.1) if cls is Windowed else None
    res = evaluate(cfg(voc, tmp_path / "run", method=WINDOWED, protocol="tcl", sweep_threshold=sweep), cls())
    pairs = []
    for i in IDS:
        x = torch.from_numpy(stored_pixels(voc, i)).permute(2, 0, 1)[None].float()
        prepared = F.interpolate(x, size=(448, 597), mode="bilinear", align_corners=False).round().clamp(0, 255)
        fg = torch.from_numpy(painter_scores(prepared[0].permute(1, 2, 0).to(torch.uint8).numpy(), 20))
        if cls is Windowed:
            back = F.interpolate(fg[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            pred = torch.where(back.max(0).values > 0.5, back.argmax(0) + 1, 0)
        else:  # the method's channel is stitched and resized like the others
            scores = torch.cat([torch.full((1, 448, 597), 0.3), fg])
            pred = F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0)
        pairs.append((pred.numpy(), voc_gt(voc, i)))
    assert_matches(res, direct_metric(pairs, 21), VOC21)
    assert res["bg_threshold"] == (0.5 if cls is Windowed else None)
    if cls is Windowed:
        assert res["sweep"]["rule_agreement"] == 1.0 and res["sweep"]["miou"][2] == res["miou"]


def test_method_without_score_crop_falls_back_and_says_so(voc, tmp_path):
    painter = Painter()
    res = evaluate(cfg(voc, tmp_path / "run", protocol="tcl"), painter)
    assert painter.sizes == [(597, 448)] * 3  # the whole resized image, no windows
    assert res["inference"] == "segment (fallback)" and any("score_crop" in n for n in res["notes"])


class OwnGeometry(Windowed):
    """Applies its paper protocol's resize and windows inside segment() (as OVDiff does)."""

    paper_protocol = "tcl"
    own_geometry = True


def test_method_with_own_geometry_gets_the_original_image(voc, tmp_path):
    seg = OwnGeometry()
    res = evaluate(cfg(voc, tmp_path / "run", protocol="tcl"), seg)
    originals = [Image.open(p).size for p in sorted((voc / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))]
    assert sorted(seg.sizes) == sorted(originals) and not seg.crops  # no pre-resize, no runner windows
    assert "itself" in res["inference"]
    other = OwnGeometry()
    evaluate(cfg(voc, tmp_path / "other", protocol="sclip"), other)  # not its paper protocol: the runner's geometry
    assert other.crops and not other.sizes


def test_resume_after_a_crash_recomputes_nothing(voc, tmp_path):
    clean = evaluate(cfg(voc, tmp_path / "clean"), Painter())
    out = tmp_path / "run"
    crashing = Painter(fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(cfg(voc, out, batch_size=1), crashing)
    assert sorted(p.name for p in (out / "preds").iterdir()) == [f"{i}.png" for i in IDS[:2]]
    resumed = Painter()
    res = evaluate(cfg(voc, out, batch_size=1), resumed)
    assert resumed.calls == 1 and res["timing"]["n_cached"] == 2
    again = Painter()
    res2 = evaluate(cfg(voc, out), again)
    assert again.calls == 0
    for r in (res, res2):
        assert r["per_class_iou"] == clean["per_class_iou"] and r["miou"] == clean["miou"]


def test_cache_of_other_settings_is_refused(voc, tmp_path):
    out = tmp_path / "run"
    evaluate(cfg(voc, out), Painter())
    with pytest.raises(EvalConfigError, match=r"different config\.bg_threshold;"):
        evaluate(cfg(voc, out), Painter(Painter.Config(bg_threshold=0.7)))
    with pytest.raises(EvalConfigError, match="protocol"):
        evaluate(cfg(voc, out, protocol="tcl"), Painter())


def test_missing_prediction_is_an_error(voc, tmp_path):
    with pytest.raises(RuntimeError, match=r"no prediction for 1 image\(s\), e.g. 2007_000003"):
        evaluate(cfg(voc, tmp_path / "run", batch_size=3), Painter(drop_last=True))


# -- candidates ---------------------------------------------------------------------------------------
def test_candidates_file_is_used_and_hashed(voc, tmp_path):
    f = tmp_path / "cands.json"
    f.write_text(json.dumps({"2007_000001.jpg": "dining table person", "2007_000002": ["cat", "bird"],
                             "2007_000003": "", "2099_999999": ["dog"]}))
    painter = Painter()
    res = evaluate(cfg(voc, tmp_path / "run", candidates_file=str(f)), painter)
    given = [["diningtable", "person"], ["cat", "bird"], []]
    assert painter.given == given
    assert res["candidates"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert res["candidates"]["source"] == "file" and res["candidates"]["empty_lists"] == 1
    preds = [painter_labels(stored_pixels(voc, i), 20, 0.5, [VOC20.index(c) for c in g]) for i, g in zip(IDS, given)]
    assert_matches(res, direct_metric([(p, voc_gt(voc, i)) for p, i in zip(preds, IDS)], 21), VOC21)


def test_candidate_file_formats_and_errors(voc, tmp_path):
    names = list(VOC21)
    ds_format = {"synonym_matching": {"/x/2007_000001.jpg": ["dog"]},
                 "image_similarity": {"/abs/VOC/2007_000001.jpg": ["plane"], "/abs/VOC/2007_000002.jpg": ["cat"]},
                 "text_similarity": {"/abs/VOC/2007_000001.jpg": ["people", "plane"], "/abs/VOC/2007_000002.jpg": []}}
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds_format))
    got, fmt = load_candidates(f, "voc21", ["2007_000001", "2007_000002"], names, VOC21)
    assert got == {"2007_000001": ["aeroplane", "person"], "2007_000002": ["cat"]} and "DiffSegmenter" in fmt
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"COCO_val2014_000000182611.jpg": "tv couch teddy bear"}))
    from ovss.data.names import COCO_OBJECT
    got, _ = load_candidates(coco, "coco_object", ["000000182611"], list(COCO_OBJECT), COCO_OBJECT)
    assert got == {"000000182611": ["tv", "couch", "teddy bear"]}
    for content, message in [({"2007_000001": ["cat"], "2007_000002": ["cat"]}, "no entry for 1 of 3"),
                             ({i: ["unicorn"] for i in IDS}, "'unicorn'"), ([1, 2], "JSON object")]:
        f.write_text(json.dumps(content))
        with pytest.raises(EvalConfigError, match=message):
            evaluate(cfg(voc, tmp_path / "bad", candidates_file=str(f)), Painter())
    f.write_text(json.dumps({i: ["cat"] for i in IDS}))
    with pytest.raises(EvalConfigError, match="candidates protocol only"):
        evaluate(cfg(voc, tmp_path / "bad", protocol="tcl", candidates_file=str(f)), Painter())


def test_name_set_reaches_the_method_and_the_report(voc, tmp_path):
    painter = Painter()
    res = evaluate(cfg(voc, tmp_path / "run", name_set="faseg"), painter)
    assert "dining table" in res["per_class_iou"] and "diningtable" not in res["per_class_iou"]
    assert res["classes_source"] == "name set 'faseg'"
    with pytest.raises(EvalConfigError, match="does not cover"):
        evaluate(cfg(voc, tmp_path / "x", dataset="cityscapes", protocol="tcl", name_set="faseg"), Painter())
    mine = [f"class {k}" for k in range(20)]
    painter = Painter()
    res = evaluate(cfg(voc, tmp_path / "own", classes=mine, classes_file="mine.txt"), painter)
    assert list(res["per_class_iou"]) == ["background", *mine] and res["classes_source"] == "classes file mine.txt"
    with pytest.raises(EvalConfigError, match="19 class names given, the labels need 20"):
        evaluate(cfg(voc, tmp_path / "bad", classes=mine[:19]), Painter())


# -- threshold sweep ----------------------------------------------------------------------------------
def test_quantised_scores_decide_like_float32():
    rng = np.random.default_rng(1)
    grid = np.array([t / 10_000 for t in range(2990, 3011)], np.float32)
    s = np.concatenate([rng.random(2000, dtype=np.float32), grid, np.nextafter(grid, 1), np.nextafter(grid, 0),
                        np.float32([-0.5, 0, 7.0])])
    q = quantise_scores(s)
    cls = np.zeros_like(q)
    for t in [0.0, 0.2999, 0.3, 0.3001, 0.5, 0.74]:
        assert np.array_equal(labels_at(q, cls, t), (s > np.float32(t)).astype(np.int64)), t
    assert sweep_values(parse_sweep("0.30:0.74:0.01"))[:3] == [0.3, 0.31, 0.32]
    assert len(sweep_values(parse_sweep("0.30:0.74:0.01"))) == 45
    with pytest.raises(ValueError):
        sweep_values((0.3, 0.4, 0.00005))
    with pytest.raises(ValueError):
        parse_sweep("0.3-0.7")


def test_sweep_on_cached_scores_equals_rerunning_each_threshold(voc, tmp_path):
    res = evaluate(cfg(voc, tmp_path / "sweep", sweep_threshold=(0.2, 0.8, 0.1)), Painter())
    sweep = res["sweep"]
    assert sweep["oracle"] is True and "oracle" in sweep["label"] and sweep["rule_agreement"] == 1.0
    assert sweep["thresholds"] == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert len(list((tmp_path / "sweep" / "scores").glob("*.npz"))) == 3
    values = []
    for k, tau in enumerate(sweep["thresholds"]):
        rerun = evaluate(cfg(voc, tmp_path / f"tau{k}"), Painter(Painter.Config(bg_threshold=tau)))
        assert (sweep["miou"][k], sweep["miou_plain"][k], sweep["aacc"][k]) == (
            rerun["miou"], rerun["miou_plain"], rerun["aacc"]), tau
        values.append(rerun["miou_plain"])
    assert len(set(values)) > 2  # τ matters on this fixture
    assert sweep["best_miou_protocol"] == max(values)
    assert sweep["best_threshold"] == sweep["thresholds"][values.index(max(values))]
    assert res["miou"] == sweep["miou"][3]  # the run itself used the method's τ = 0.5
    assert "ORACLE" in (tmp_path / "sweep" / "results.md").read_text()
    # resuming from the cache reproduces the sweep without calling the method
    again = Painter()
    assert evaluate(cfg(voc, tmp_path / "sweep", sweep_threshold=(0.2, 0.8, 0.1)), again)["sweep"]["miou"] == \
        sweep["miou"] and again.calls == 0
    with pytest.raises(EvalConfigError, match="background"):
        evaluate(cfg(voc, tmp_path / "x", dataset="voc20", protocol="tcl", sweep_threshold=(0.2, 0.8, 0.1)), Painter())


# -- toy benchmark ------------------------------------------------------------------------------------
def test_toy_dataset_in_both_senses():
    toy, full = get_dataset("toy", root=None, limit=3), get_dataset("toy_full", None, "test", limit=2)
    assert toy.class_names == list(TOY_THINGS_WITH_BG) and toy.has_background and toy.split == "val"
    assert full.class_names == list(TOY_CLASSES) and not full.has_background and len(full) == 2
    scene = make_scene(1_000_001, 64)
    assert toy[1].id == "val_1000001"
    assert np.array_equal(toy.load_label(toy[1]), scene.labels_things)
    assert np.array_equal(np.asarray(toy.load_image(toy[1])), np.asarray(scene.image))
    assert np.array_equal(full.load_label(full[0]), make_scene(2_000_000, 64).labels_full)
    assert len(get_dataset("toy", None)) == 100
    with pytest.raises(ValueError, match="split"):
        get_dataset("toy", None, "train")


@pytest.mark.parametrize("key, method, protocol", [("toy", PAINTER, "candidates"), ("toy_full", WINDOWED, "tcl")])
def test_toy_evaluation(tmp_path, key, method, protocol):
    seg = Painter() if method == PAINTER else Windowed()
    res = evaluate(EvalConfig(method=method, dataset=key, out_dir=tmp_path / "run", limit=3, size=32,
                              protocol=protocol, grid=3), seg)
    pairs = []
    for seed in range(1_000_000, 1_000_003):
        scene = make_scene(seed, 32)
        a = np.asarray(scene.image)
        if key == "toy":
            pairs.append((painter_labels(a, 7, 0.5), scene.labels_things.astype(np.int64)))
        else:
            x = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float()
            big = F.interpolate(x, size=(448, 448), mode="bilinear", align_corners=False).round().clamp(0, 255)
            s = torch.from_numpy(painter_scores(big[0].permute(1, 2, 0).to(torch.uint8).numpy(), 12))
            back = F.interpolate(s[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
            pairs.append((back.argmax(0).numpy(), scene.labels_full.astype(np.int64)))
    names = TOY_THINGS_WITH_BG if key == "toy" else TOY_CLASSES
    assert_matches(res, direct_metric(pairs, len(names)), names)
    assert res["size"] == 32 and (tmp_path / "run" / "grid.png").is_file()


# -- CLI ----------------------------------------------------------------------------------------------
def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_cli_help_and_bad_dataset(capsys, tmp_path):
    assert run("eval", "--help") == 0
    text = capsys.readouterr().out
    assert "--sweep-threshold" in text and "--compare" in text and "candidates" in text
    assert run("eval", "-m", PAINTER, "--dataset", "voc22", "-o", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'voc22'" in err and "voc21" in err and "toy_full" in err
    assert run("eval", "-m", PAINTER, "--dataset", "voc21", "-o", tmp_path / "o") == 2
    assert "data root" in capsys.readouterr().err
    assert run("eval", "--dataset", "toy") == 2
    assert "-m/--method" in capsys.readouterr().err


def test_cli_runs_and_compares(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("eval", "-m", PAINTER, "--dataset", "toy", "--limit", 2, "--size", 32, "--set", "bg_threshold=0.6",
               "--grid", 0, "-o", a) == 0
    out = capsys.readouterr().out
    ra = json.loads((a / "results.json").read_text())
    assert ra["config"]["bg_threshold"] == 0.6 and ra["n_images"] == 2 and f"{ra['miou_plain']:.2f}" in out
    assert run("eval", "-m", WINDOWED, "--dataset", "toy", "--limit", 2, "--size", 32, "--protocol", "tcl",
               "--grid", 0, "-o", b) == 0
    rb = json.loads((b / "results.json").read_text())
    capsys.readouterr()
    assert run("eval", "--compare", a / "results.json", b / "results.json") == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "|  | a | b |"
    assert f"| **mIoU (protocol's mean)** | **{ra['miou_plain']:.2f}** | **{rb['miou']:.2f}** |" in lines
    ball = rb["per_class_iou"]["ball"]
    assert any(ln.startswith("| ball |") and ln.endswith(f"| {'–' if ball is None else f'{ball:.2f}'} |")
               for ln in lines)
    assert "not comparable" in table  # candidates vs tcl
    (tmp_path / "junk.json").write_text("{}")
    assert run("eval", "--compare", a / "results.json", tmp_path / "junk.json") == 2
    assert "not an ovss eval results file" in capsys.readouterr().err


def test_cli_interrupt_keeps_the_cache(capsys, tmp_path, monkeypatch):
    def interrupted(self, images, request):
        raise KeyboardInterrupt

    monkeypatch.setattr(Painter, "_segment_batch", interrupted)
    out = tmp_path / "o"
    assert run("eval", "-m", PAINTER, "--dataset", "toy", "--limit", 1, "--size", 32, "-o", out) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert (out / "run.json").is_file()
