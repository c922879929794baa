"""FA-Seg: the map arithmetic against a literal restatement of faseg.md §3, and the pipeline on tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovss
from ovss.diffusion.latents import ddim_inversion_step
from ovss.methods.faseg import (
    FASegConfig,
    affinity_power_apply,
    class_cross_maps,
    class_maps,
    level_weights,
)

RES = 128  # tiny VAE: 128 px -> 16×16 latents; attention at factors 1/2/4/8 = sides 16/8/4/2


# ---------------------------------------------------------------------------------------------------
# Literal restatement of the spec (materialises every L²×L² matrix; only for small L)
# ---------------------------------------------------------------------------------------------------
def explicit_affinity(S: torch.Tensor, side: int, mode: str = "official") -> torch.Tensor:
    """Âʳ as faseg.md §3.1 step 10 builds it, as an explicit (L², L²) matrix."""
    r = int(round(S.shape[0] ** 0.5))
    if r == side:
        return S.clone()
    s = side // r
    block_of = torch.tensor([(p // side // s) * r + (p % side) // s for p in range(side * side)])
    if mode == "official":
        # queries: an r×r grid with r² key channels, upsampled bicubically to L×L
        q_up = F.interpolate(S.T.reshape(1, r * r, r, r), size=(side, side), mode="bicubic", align_corners=False)
        q_up = q_up.reshape(r * r, side * side).T  # (L² queries, r² keys)
        return q_up[:, block_of]  # keys repeated (nearest)
    # paper: each query's key map upsampled bicubically, queries repeated
    k_up = F.interpolate(S.reshape(r * r, 1, r, r), size=(side, side), mode="bicubic", align_corners=False)
    k_up = k_up.reshape(r * r, side * side)  # (r² queries, L² keys)
    return k_up[block_of]


def random_self_map(r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(r * r, r * r, generator=g) * 3, dim=1)


def spec_minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return torch.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


@pytest.mark.parametrize("mode", ["official", "paper"])
@pytest.mark.parametrize("r", [2, 4, 8, 16])
def test_affinity_power_equals_explicit_matrix(mode, r):
    side = 16
    S = random_self_map(r, seed=r)
    v = torch.randn(side * side, 3, generator=torch.Generator().manual_seed(1))
    A = explicit_affinity(S, side, mode)
    expected = (A @ A) @ v  # Pʳ = (Âʳ)², then the product
    got = affinity_power_apply(S, v, side, power=2, mode=mode)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_official_affinity_rows_sum_to_block_area_and_keep_negative_lobes():
    side, r = 16, 4
    A = explicit_affinity(random_self_map(r, 0), side)
    assert torch.allclose(A.sum(1), torch.full((side * side,), (side / r) ** 2), rtol=1e-4)
    assert (A < 0).any(), "bicubic negative lobes must be kept, not clamped"
    # columns inside one repeated key block are equal
    assert torch.equal(A[:, 0], A[:, 1]) and torch.equal(A[:, 0], A[:, side])


def test_class_maps_match_the_spec_formulas():
    """c_k = mean_span Σ_r w× NearestUp(Cʳ); M_k = Σ_r wˢ minmax(Pʳ c_k) (steps 9-11)."""
    side, T = 16, 77
    g = torch.Generator().manual_seed(3)
    factors = (8, 4, 2, 1)
    cross = {f: torch.softmax(torch.randn((side // f) ** 2, T, generator=g), 1) for f in factors}
    selfs = {f: random_self_map(side // f, f) for f in factors}
    spans = [[1, 2], [4], [6, 7, 8]]
    w_cross = {8: 0.15, 4: 0.70, 2: 0.15}
    w_self = {8: 0.1, 4: 0.1, 2: 0.5, 1: 0.3}

    fused = sum(w * F.interpolate(cross[f].T.reshape(1, T, side // f, side // f), size=(side, side),
                                  mode="nearest")[0] for f, w in w_cross.items())  # (77, L, L)
    expected = []
    for span in spans:
        c = fused[span].mean(0).reshape(-1)
        m = sum(w * spec_minmax(explicit_affinity(selfs[f], side) @ (explicit_affinity(selfs[f], side) @ c))
                for f, w in w_self.items())
        expected.append(m.reshape(side, side))
    expected = torch.stack(expected)

    c = class_cross_maps({f: cross[f] for f in w_cross}, spans, w_cross, side)
    got = class_maps(c, selfs, w_self, power=2)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1 + 1e-6


def test_level_weights_drop_missing_levels_and_renormalise(caplog):
    assert level_weights((0.15, 0.70, 0.15, 0.0), {1, 2, 4, 8}, "cross") == {8: 0.15, 4: 0.70, 2: 0.15}
    w = level_weights((0.15, 0.70, 0.15, 0.0), {1, 2, 4}, "cross")
    assert set(w) == {4, 2} and abs(sum(w.values()) - 1.0) < 1e-9 and abs(w[4] / w[2] - 0.70 / 0.15) < 1e-9
    assert "absent" in caplog.text
    with pytest.raises(ValueError, match="no cross-attention level"):
        level_weights((0.15, 0.70, 0.15, 0.0), {1}, "cross")


def test_inversion_step_is_the_official_ddim_update():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a0, a1 = 0.99915, 0.998296
    expected = a1**0.5 * (z0 - (1 - a0) ** 0.5 * eps) / a0**0.5 + (1 - a1) ** 0.5 * eps
    got = ddim_inversion_step(z0, eps, a0, a1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got, 0.999573 * z0 + 0.012137 * eps, atol=1e-4)  # the spec's rounded coefficients


def test_config_presets_and_validation():
    assert FASegConfig(bg_threshold="context").bg_threshold == 0.50
    assert FASegConfig(bg_threshold="coco_object").bg_threshold == 0.60
    with pytest.raises(ValueError, match="preset"):
        FASegConfig(bg_threshold="cityscapes")
    with pytest.raises(ValueError, match="inversion"):
        FASegConfig(inversion="ddim50")
    with pytest.raises(TypeError, match="unknown option"):
        ovss.create("faseg", models="tiny", bg_treshold=0.5)


# ---------------------------------------------------------------------------------------------------
# The pipeline on tiny random-weight models
# ---------------------------------------------------------------------------------------------------
def scene(w: int = 70, h: int = 50) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2] = (40, 90, 200)
    arr[h // 2 :] = (60, 160, 40)
    arr[10:30, 10:35] = (220, 30, 30)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def make():
    cache = {}

    def _make(**cfg):
        key = tuple(sorted(cfg.items()))
        if key not in cache:
            cfg.setdefault("resolution", RES)
            cfg.setdefault("candidates", "all")
            cfg.setdefault("caption", "simple")
            cache[key] = ovss.create("faseg", models="tiny", **cfg)
        return cache[key]

    return _make


class CountCalls:
    def __init__(self, unet):
        self.n = 0
        self.unet = unet
        self.orig = unet.forward

    def __enter__(self):
        def counted(*a, **k):
            self.n += 1
            return self.orig(*a, **k)

        self.unet.forward = counted
        return self

    def __exit__(self, *exc):
        self.unet.forward = self.orig


def test_segment_shapes_labels_and_meta(make):
    seg = make()
    img = scene()
    out = seg.segment(img, classes=["sky", "grass", "ball"])
    assert out.labels.shape == (50, 70)
    assert out.classes == ["background", "sky", "grass", "ball"]
    assert set(np.unique(out.labels)) <= {0, 1, 2, 3}
    assert out.scores.shape == (4, 50, 70)
    assert out.scores_lowres.shape == (4, RES, RES)
    assert np.allclose(out.scores_lowres[0], 0.55)  # background channel holds τ
    u = out.scores_lowres[1:]
    assert u.max() <= 1.05 and u.min() >= -0.05  # M_k ∈ [0,1]; bicubic overshoot only
    assert out.meta["class_prompt"] == "sky, grass, ball"
    assert out.meta["text_prompt"] == "a photo of sky, grass, ball ; sky, grass, ball"


def test_deterministic_under_seed(make):
    seg = make()
    a = seg.segment(scene(), classes=["sky", "grass"])
    b = seg.segment(scene(), classes=["sky", "grass"])
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.scores_lowres, b.scores_lowres)
    c = make(seed=1).segment(scene(), classes=["sky", "grass"])
    assert not np.array_equal(a.scores_lowres, c.scores_lowres)


def test_unet_calls_independent_of_class_count(make):
    for inversion, expected in (("official", 2), ("none", 1)):
        seg = make(inversion=inversion)
        for classes in (["sky"], ["sky", "grass", "ball", "kite", "star"]):
            with CountCalls(seg.models["diffusion"].unet) as cc:
                seg.segment(scene(), classes=classes)
            assert cc.n == expected


def test_empty_candidates_give_background_without_model_calls(make):
    seg = make()
    with CountCalls(seg.models["diffusion"].unet) as cc:
        out = seg.segment(scene(), classes=["sky", "grass"], given=[])
    assert cc.n == 0
    assert (out.labels == 0).all() and out.labels.shape == (50, 70)


def test_background_threshold_rule(make):
    seg = make()
    img = scene()
    none_bg = seg.segment(img, classes=["sky", "grass"], bg_threshold=0.0)
    assert (none_bg.labels != 0).all()
    all_bg = seg.segment(img, classes=["sky", "grass"], bg_threshold=1.5)
    assert (all_bg.labels == 0).all()
    # max U == τ exactly counts as the class (ties go to the class); a square R² input keeps pixels 1:1
    sq = img.resize((RES, RES))
    u = seg.segment(sq, classes=["sky", "grass"], bg_threshold=0.0).scores_lowres[1:]
    best = u.max(0)
    y, x = np.unravel_index(best.argmin(), best.shape)
    tie = seg.segment(sq, classes=["sky", "grass"], bg_threshold=float(best[y, x]))
    assert tie.labels[y, x] != 0
    assert (tie.labels[best < best[y, x]] == 0).all()


def test_ttf_is_flip_equivariant_and_averages_branches(make):
    """With the posterior mean, scores(hflip I) = hflip(scores(I)); TTF = mean of the two branches."""
    img = scene().resize((RES, RES))
    flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    seg = make(vae_sample="mean")
    a = seg.segment(img, classes=["sky", "grass", "ball"]).scores_lowres
    b = seg.segment(flipped, classes=["sky", "grass", "ball"]).scores_lowres
    assert np.allclose(b, a[..., ::-1], atol=1e-4)
    # Same batch layout as TTF's [image, flip] (random tiny weights give nearly flat maps, so the min-max would
    # amplify the ~1e-7 differences between batch-1 and batch-2 kernels).
    single = make(vae_sample="mean", ttf=False)
    s0, s1 = (o.scores_lowres for o in single.segment_many([img, flipped], classes=["sky", "grass", "ball"],
                                                            batch_size=2))
    assert np.allclose(a[1:], (s0[1:] + s1[1:, :, ::-1]) / 2, atol=1e-4)
    assert not np.allclose(s0[1:], a[1:], atol=1e-4)


class PositionFreeEncoder(torch.nn.Module):
    """A text encoder whose output row depends on the token id alone (no position, no causality)."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = torch.nn.Embedding(49408, dim)
        torch.nn.init.normal_(self.emb.weight, generator=torch.Generator().manual_seed(0))

    @property
    def device(self):
        return self.emb.weight.device

    @property
    def dtype(self):
        return self.emb.weight.dtype

    def forward(self, ids):
        return (self.emb(ids),)


def test_class_order_bookkeeping_with_position_free_encoder(make):
    seg = make(vae_sample="mean")
    dm = seg.models["diffusion"]
    original = dm.text_encoder
    dm.text_encoder = PositionFreeEncoder(dm.unet.config.cross_attention_dim)
    try:
        vocab = ["sky", "grass", "ball"]
        a = seg.segment(scene(), classes=vocab, given=["sky", "grass", "ball"])
        b = seg.segment(scene(), classes=vocab, given=["ball", "sky", "grass"])
    finally:
        dm.text_encoder = original
    # scores are reported in vocabulary order whatever the prompt order was
    assert a.classes == b.classes == ["background", *vocab]
    assert np.allclose(a.scores_lowres, b.scores_lowres, atol=1e-4)
    assert np.array_equal(a.labels, b.labels)


def test_dual_prompt_off_and_options_run(make):
    base = make(vae_sample="mean").segment(scene(), classes=["sky", "grass"]).scores_lowres
    for opts in ({"dual_prompt": False}, {"self_resize": "paper"}, {"cross_upsample": "bilinear"},
                 {"inversion": "rf_1plus1"}):
        out = make(vae_sample="mean", **opts).segment(scene(), classes=["sky", "grass"])
        assert out.labels.shape == (50, 70)
        assert not np.allclose(out.scores_lowres, base, atol=1e-6), opts


def test_label_resize_scores_mode(make):
    out = make(label_resize="scores").segment(scene(90, 40), classes=["sky", "grass"], bg_threshold=0.0)
    assert out.labels.shape == (40, 90) and set(np.unique(out.labels)) <= {1, 2}


def test_without_background_every_pixel_gets_a_class(make):
    out = make().segment(scene(), classes=["sky", "grass"], background=False)
    assert out.classes == ["sky", "grass"] and set(np.unique(out.labels)) <= {0, 1}
    with pytest.raises(ValueError, match="no candidate"):
        make().segment(scene(), classes=["sky"], background=False, given=[])


def test_long_vocabulary_is_split_into_key_chunks(make):
    names = [f"{a} {b}" for a in ("red", "blue", "green", "small", "large", "old") for b in ("ball", "box", "kite",
                                                                                             "star", "ring", "wall")]
    seg = make(max_class_tokens=20)
    out = seg.segment(scene(), classes=names)
    assert out.scores_lowres.shape[0] == len(names) + 1
    u = out.scores_lowres[1:]
    assert np.all(u.reshape(len(names), -1).max(1) > 0.5), "every class in every chunk gets a normalised map"


def test_segment_many_batches_equal_single_calls(make):
    seg = make()
    imgs = [scene(), scene(40, 60), scene(64, 64)]
    many = list(seg.segment_many(imgs, classes=["sky", "grass"], batch_size=2))
    for img, m in zip(imgs, many):
        one = seg.segment(img, classes=["sky", "grass"])
        assert np.allclose(one.scores_lowres, m.scores_lowres, atol=1e-4)
        assert np.array_equal(one.labels, m.labels)


# ---------------------------------------------------------------------------------------------------
# Bad and unusual input, through the real method
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_image", [
    lambda: Image.new("RGB", (8, 8), (200, 10, 10)),
    lambda: scene().convert("L"),
    lambda: scene().convert("RGBA"),
    lambda: Image.fromarray((np.arange(60 * 40, dtype=np.uint16).reshape(40, 60) * 27).astype(np.uint16)),
    lambda: np.asarray(scene()),
], ids=["8x8", "grayscale", "rgba", "16bit", "numpy"])
def test_any_input_mode_gives_a_label_map_of_its_size(make, make_image):
    img = make_image()
    out = make().segment(img, classes=["sky", "grass"])
    h, w = (img.shape[:2] if isinstance(img, np.ndarray) else (img.height, img.width))
    assert out.labels.shape == (h, w) and set(np.unique(out.labels)) <= {0, 1, 2}


def test_huge_image_gives_a_full_size_label_map(make):
    img = Image.new("RGB", (6000, 4000), (30, 120, 200))
    out = make().segment(img, classes=["sky"])
    assert out.labels.shape == (4000, 6000)
    assert out.scores_lowres.shape == (2, RES, RES)  # full-size scores only on access


def test_out_of_memory_halves_the_batch_and_keeps_results(make, monkeypatch, caplog):
    seg = make()
    imgs = [scene(), scene(40, 60), scene(64, 64), scene(30, 30)]
    expected = [o.labels for o in seg.segment_many(imgs, classes=["sky", "grass"], batch_size=1)]
    real = type(seg)._segment_batch
    sizes = []

    def flaky(self, images, request):
        sizes.append(len(images))
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images, request)

    monkeypatch.setattr(type(seg), "_segment_batch", flaky)
    got = [o.labels for o in seg.segment_many(imgs, classes=["sky", "grass"], batch_size=4)]
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert "out of memory" in caplog.text


def test_other_runtime_errors_are_not_swallowed(make, monkeypatch):
    seg = make()
    monkeypatch.setattr(type(seg), "_segment_batch", lambda self, images, request: (_ for _ in ()).throw(
        RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(seg.segment_many([scene(), scene()], classes=["sky"], batch_size=2))


def test_bad_class_lists_and_truncation(make, caplog):
    seg = make()
    for bad, msg in (([], "empty"), (["sky", "Sky"], "duplicate"), (["sky", " "], "blank"),
                     (["background", "sky"], "reserved")):
        with pytest.raises(ValueError, match=msg):
            seg.segment(scene(), classes=bad)
    with pytest.raises(ValueError, match="needs 80 > 75 tokens"):
        seg.segment(scene(), classes=["sky " * 80])
    out = seg.segment(scene(), classes=["sky", "grass"], caption="a very long caption " * 20)
    assert out.labels.shape == (50, 70)
    assert "truncated" in caplog.text


def test_cli_segment_folder_with_faseg(tmp_path):
    from ovss.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    scene().save(folder / "a.png")
    scene(33, 21).convert("L").save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    code = main(["segment", str(folder), "-m", "faseg", "-c", "sky,grass", "--models", "tiny", "--masks",
                 "--set", f"resolution={RES}", "--set", "candidates=all", "--set", "caption=simple", "-o", str(out)])
    assert code == 1  # the broken file is reported and skipped; the others finish
    import json

    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert classes == ["background", "sky", "grass"]
    for stem, size in (("a", (50, 70)), ("b", (21, 33))):
        labels = np.array(Image.open(out / f"{stem}.png"))
        assert labels.shape == size and labels.max() < len(classes)
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["meta"]["method"] == "faseg"
        assert abs(sum(summary["present"].values()) - 1) < 1e-6
    assert not (out / "broken.png").exists()
