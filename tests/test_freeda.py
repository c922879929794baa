"""FreeDA inference: retrieval, aggregation, superpixel pooling, local/global mixing, background, end to end.

The formulas are checked against direct restatements of freeda.md §4 on synthetic data; the end-to-end test
builds a bank from a few captions with tiny models, indexes it and segments an image with it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovss
from ovss.banks.bank import Entries, write_bank
from ovss.banks.index import build_index
from ovss.cli import main
from ovss.dense.superpixels import (FELZENSZWALB_PRESETS, axis_weights, pool_regions, region_weights,
                                    superpixels)
from ovss.methods.freeda import (BETA, FREEDA_TEMPLATES, OPENAI_CLIP_LOGIT_SCALE, aggregate_scores, class_embeddings,
                                 clip_text_raw, mix_scores, region_local_scores, temperature_matched_beta)

pytest.importorskip("faiss")

KEY_DIM, PROTO_DIM = 16, 32  # tiny CLIP projection / tiny DINOv2 width


def _image(seed: int = 0, size=(70, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.zeros((*size, 3), dtype=np.uint8)
    arr[:, : size[1] // 2] = (200, 40, 40)
    arr[:, size[1] // 2:] = (30, 60, 210)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    """A synthetic bank: random keys and prototypes with the tiny models' widths, one NaN prototype."""
    gen = torch.Generator().manual_seed(0)
    n = 60
    protos = torch.randn(n, PROTO_DIM, generator=gen)
    protos[7, 3] = float("nan")
    keys = F.normalize(torch.randn(n, KEY_DIM, generator=gen), dim=-1)
    entries = Entries(protos, keys, torch.arange(n), torch.rand(n, generator=gen), [f"noun{i}" for i in range(n)],
                      [str(i) for i in range(n)])
    out = write_bank(iter([entries]), tmp_path_factory.mktemp("bank"), {"models": {"clip": "tiny", "dinov2": "tiny"}},
                     part_rows=25)
    build_index(out, "flat")
    return out


@pytest.fixture(scope="module")
def method(bank_dir):
    return ovss.create("freeda", models="tiny", device="cpu", bank=str(bank_dir), k=10, short_side=None, crop=48,
                       stride=24)


# -- text and retrieval -----------------------------------------------------------------------------------


def test_class_embedding_averages_raw_template_embeddings_then_normalises(method):
    clip = method.models["clip"]
    names = ["cat", "tv monitor"]
    raw = clip_text_raw(clip, [t.format(n) for n in names for t in FREEDA_TEMPLATES]).view(2, 7, -1)
    expected = raw.mean(1) / raw.mean(1).norm(dim=-1, keepdim=True)
    assert torch.allclose(class_embeddings(clip, names), expected, atol=1e-6)
    # Normalising each template first would give another vector (trap 3).
    assert not torch.allclose(F.normalize(F.normalize(raw, dim=-1).mean(1), dim=-1), expected, atol=1e-4)


def test_retrieval_takes_the_brute_force_top_k_and_drops_non_finite_prototypes(method):
    names = ["cat", "dog", "sky"]
    vocab = method.vocabulary(names)
    bank = method.bank
    keys, protos = bank.keys(), bank.prototypes(np.arange(len(bank)))
    sims = vocab.text.numpy() @ keys.T
    for c in range(len(names)):
        top = np.argsort(-sims[c])[:10]
        finite = [i for i in top if np.isfinite(protos[i]).all()]
        got = vocab.prototypes[c].numpy()
        assert got.shape == (len(finite), PROTO_DIM)
        # Same set of rows (order may differ on float ties): compare as sorted rows.
        assert np.allclose(np.sort(got, axis=0), np.sort(protos[finite], axis=0), atol=0)
        assert vocab.stats[names[c]]["retrieved"] == len(finite)
    assert method.vocabulary(names) is vocab  # cached per class list


def test_a_list_stops_at_the_first_minus_one(bank_dir):
    m = ovss.create("freeda", models="tiny", device="cpu", bank=str(bank_dir), k=500, index="flat")
    vocab = m.vocabulary(["cat"])
    assert vocab.prototypes[0].shape[0] == 59  # 60 rows, one non-finite; ids past the bank are −1


# -- aggregation ------------------------------------------------------------------------------------------


def test_each_aggregation_mode_against_its_formula():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 6, generator=gen)
    protos = [torch.randn(4, 6, generator=gen) * 3, torch.randn(7, 6, generator=gen)]
    xn = x / x.norm(dim=1, keepdim=True)
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())  # noqa: E731
    mean_emb = torch.tensor([[float(cos(xi, p.mean(0))) for p in protos] for xi in x])
    mean_sim = torch.tensor([[float(torch.stack([cos(xi, pk) for pk in p]).mean()) for p in protos] for xi in x])
    max_sim = torch.tensor([[float(torch.stack([cos(xi, pk) for pk in p]).max()) for p in protos] for xi in x])
    assert torch.allclose(aggregate_scores(x, protos, "mean_embedding"), mean_emb, atol=1e-5)
    assert torch.allclose(aggregate_scores(x, protos, "mean_similarity"), mean_sim, atol=1e-5)
    assert torch.allclose(aggregate_scores(x, protos, "max_similarity"), max_sim, atol=1e-5)
    # mean_embedding averages raw prototypes (trap 4): not the mean of normalised ones.
    normalised = torch.stack([F.normalize(p, dim=-1).mean(0) for p in protos])
    assert not torch.allclose(aggregate_scores(x, protos, "mean_embedding"), xn @ F.normalize(normalised, dim=-1).T,
                              atol=1e-3)


# -- superpixels and pooling --------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["felzenszwalb", "slic", "watershed"])
def test_superpixel_labels_partition_the_crop(algo):
    rgb = np.asarray(_image(1), dtype=np.float32)
    labels = superpixels(rgb, algo)
    assert labels.shape == rgb.shape[:2] and labels.dtype == np.int64
    assert labels.min() == 0 and set(np.unique(labels)) == set(range(labels.max() + 1))
    assert labels.max() >= 1
    assert superpixels(rgb, "none") is None


def test_felzenszwalb_presets_follow_the_official_configs():
    assert FELZENSZWALB_PRESETS["voc20"] == (100.0, 0.7, 20)
    assert FELZENSZWALB_PRESETS["cityscapes"] == (20.0, 0.5, 50)
    assert FELZENSZWALB_PRESETS["coco_object"] == FELZENSZWALB_PRESETS["coco_stuff"] == (100.0, 1.0, 100)
    rgb = np.asarray(_image(2), dtype=np.float32)
    from skimage.segmentation import felzenszwalb

    direct = felzenszwalb(rgb / 255.0, scale=20.0, sigma=0.5, min_size=50, channel_axis=-1)
    ours = superpixels(rgb, felzenszwalb="cityscapes")
    # Same partition (labels renumbered): a bijection between the two label sets.
    pairs = set(zip(direct.ravel().tolist(), ours.ravel().tolist()))
    assert len(pairs) == len(np.unique(direct)) == len(np.unique(ours))


def test_region_weights_equal_per_region_bilinear_align_corners_resize():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, (23, 31))
    w = region_weights(labels, (7, 9), "bilinear")
    onehot = torch.from_numpy(np.eye(5)[labels]).permute(2, 0, 1).float()
    ref = F.interpolate(onehot[None], size=(7, 9), mode="bilinear", align_corners=True)[0].reshape(5, -1)
    assert torch.allclose(w, ref, atol=1e-5)


def test_area_weights_are_exact_fractional_coverage():
    labels = np.zeros((5, 7), dtype=np.int64)
    labels[:, 3:] = 1
    w = region_weights(labels, (2, 3), "area").reshape(2, 2, 3)
    # Cells are 2.5 × 7/3 pixels; region 1 covers columns x >= 3, so cell column j covers [7j/3, 7(j+1)/3).
    col_cover = [max(0.0, min(7 * (j + 1) / 3, 7) - max(7 * j / 3, 3)) / (7 / 3) for j in range(3)]
    assert torch.allclose(w[1], torch.tensor([col_cover, col_cover]).float(), atol=1e-6)
    assert torch.allclose(w.sum(0), torch.ones(2, 3), atol=1e-6)
    assert np.allclose(axis_weights(10, 4, "area").sum(1), 1.0)


def test_pooling_is_the_weighted_mean_and_a_missed_superpixel_keeps_the_dense_score():
    # 9×9 crop, 3×3 grid: align_corners samples pixels 0, 4, 8 on each axis.
    labels = np.zeros((9, 9), dtype=np.int64)
    labels[5:, :] = 1
    labels[2, 2] = 2  # a one-pixel superpixel between the sample points
    w = region_weights(labels, (3, 3))
    feats = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    pooled = pool_regions(feats, w)
    for r in range(2):
        m = w[r]
        assert torch.allclose(pooled[r], (m[:, None] * feats).sum(0) / (m.sum() + 1.19e-7), atol=1e-6)
    assert float(w[2].sum()) == 0 and torch.equal(pooled[2], torch.zeros(4))
    covered = w.sum(1) > 0
    dense = torch.full((2, 9, 9), -1.0)
    region = torch.tensor([[0.1, 0.2], [0.3, 0.4], [9.0, 9.0]])
    local = region_local_scores(labels, dense, region, covered)
    assert torch.equal(local[:, 2, 2], torch.tensor([-1.0, -1.0]))  # uncovered: dense score
    assert torch.equal(local[:, 0, 0], region[0]) and torch.equal(local[:, 8, 8], region[1])
    nearest = region_local_scores(labels, dense, region, covered, "nearest_region")
    assert torch.equal(nearest[:, 2, 2], region[0])  # its neighbours belong to region 0


# -- mixing, background, the method ---------------------------------------------------------------------------


def test_mix_is_beta_local_plus_one_minus_beta_global():
    local = torch.rand(3, 4, 5)
    g = torch.tensor([0.1, -0.2, 0.3])
    assert torch.allclose(mix_scores(local, g, 0.8), 0.8 * local + 0.2 * g[:, None, None])


def test_temperature_matched_beta_labels_as_the_papers_beta_on_cosines_at_openais_temperature():
    """β' on a CLIP of logit scale s decides every pixel as β = 0.8 does on its cosines scaled by s / 100 (what
    the same confidences give at OpenAI CLIP's temperature); at scale 100 it is β itself."""
    assert temperature_matched_beta(OPENAI_CLIP_LOGIT_SCALE) == pytest.approx(BETA)
    gen = torch.Generator().manual_seed(0)
    local = torch.sigmoid(torch.randn(5, 16, 16, generator=gen))
    g = torch.randn(5, generator=gen) * 0.3
    for scale in (18.0, 50.0, 100.0):
        ours = mix_scores(local, g, temperature_matched_beta(scale)).argmax(0)
        assert torch.equal(ours, mix_scores(local, g * scale / OPENAI_CLIP_LOGIT_SCALE, BETA).argmax(0))
    unmatched = mix_scores(local, g, BETA).argmax(0)  # the paper's β on the wider cosines: CLIP decides more
    assert not torch.equal(unmatched, mix_scores(local, g, temperature_matched_beta(18.0)).argmax(0))
    assert temperature_matched_beta(18.0) > temperature_matched_beta(50.0) > BETA


def test_beta_one_ignores_clip_and_beta_zero_is_constant_over_the_crop(method):
    crop = _image(3, (48, 48))
    names = ["cat", "dog"]
    cfg = method.config
    try:
        cfg.beta = 1.0
        a = method.score_crop(crop, names, global_scores=torch.tensor([5.0, -5.0]))
        b = method.score_crop(crop, names, global_scores=torch.tensor([-3.0, 7.0]))
        assert torch.equal(a, b)
        cfg.beta = 0.0
        s = method.score_crop(crop, names)
        g = method.global_scores(torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1),
                                 method.vocabulary(names))
        assert torch.allclose(s, g.view(2, 1, 1).expand_as(s), atol=1e-6)
    finally:
        cfg.beta = 0.8


def test_score_crop_matches_the_spec_pipeline(method):
    """sigmoid(cos) of each covered superpixel's pooled DINOv2 feature with p̄, dense elsewhere, mixed with g."""
    crop = _image(4, (48, 48))
    names = ["cat", "sky"]
    s = method.score_crop(crop, names)
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)
    vocab = method.vocabulary(names)
    centres = torch.stack([p.mean(0) for p in vocab.prototypes])
    xi = F.interpolate(x[None] / 255, size=(518, 518), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    xi = (xi - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    v = method.models["dinov2"].model(pixel_values=xi).last_hidden_state[0, 1:]  # (1369, D)
    dense = torch.sigmoid(F.normalize(v, dim=-1) @ F.normalize(centres, dim=-1).T).T.reshape(2, 1, 37, 37)
    dense = F.interpolate(dense.permute(1, 0, 2, 3), size=(48, 48), mode="bilinear", align_corners=True)[0]
    labels = superpixels(np.asarray(crop, dtype=np.float32))
    g = method.global_scores(x, vocab)
    expected = torch.empty(2, 48, 48)
    for r in range(labels.max() + 1):
        m = torch.from_numpy(labels == r).float()
        mhat = F.interpolate(m[None, None], size=(37, 37), mode="bilinear", align_corners=True).reshape(-1)
        sel = torch.from_numpy(labels == r)
        if float(mhat.sum()) == 0:
            expected[:, sel] = dense[:, sel]
            continue
        pooled = (mhat[:, None] * v).sum(0) / (mhat.sum() + 1.19e-7)
        score = torch.sigmoid(F.normalize(pooled, dim=0) @ F.normalize(centres, dim=-1).T)
        expected[:, sel] = score[:, None]
    expected = 0.8 * expected + 0.2 * g[:, None, None]
    assert torch.allclose(s, expected, atol=1e-5)


def test_background_threshold_on_the_mixed_score(method, monkeypatch):
    img = _image(5, (48, 60))
    names = ["cat", "dog"]
    seg = method.segment(img, names, bg_threshold=10.0)
    assert seg.classes == ["background", "cat", "dog"] and (seg.labels == 0).all()
    seg = method.segment(img, names, bg_threshold=-10.0)
    assert (seg.labels > 0).all()
    assert np.allclose(seg.scores_lowres[0], -10.0)
    # A class exactly at the threshold loses to background (ties -> background).
    monkeypatch.setattr(method, "score_crop", lambda crop, classes, global_scores=None: torch.stack(
        [torch.full(crop.shape[-2:], 0.5), torch.full(crop.shape[-2:], 0.25)]))
    assert (method.segment(img, names, bg_threshold=0.5).labels == 0).all()
    assert (method.segment(img, names, bg_threshold=0.49).labels == 1).all()


def test_given_lists_restrict_the_classes(method):
    img = _image(5, (48, 60))
    names = ["cat", "dog", "bird"]
    free = method.segment(img, names, background=False)
    only = method.segment(img, names, background=False, given=["dog"])
    assert (only.labels == 1).all()  # the only candidate wins everywhere
    assert np.allclose(only.scores_lowres[[0, 2]], 0) and np.allclose(only.scores_lowres[1], free.scores_lowres[1])
    bg = method.segment(img, names, given=["dog", "bird"], bg_threshold=-10.0)
    assert set(np.unique(bg.labels)) <= {2, 3}


def test_options_run_and_change_the_scores(method, bank_dir):
    crop = _image(6, (48, 48))
    names = ["cat", "dog"]
    base = method.score_crop(crop, names)
    for opts in (dict(aggregation="max_similarity"), dict(superpixel="slic"), dict(superpixel="none"),
                 dict(region_pool="area"), dict(local_activation="identity"), dict(clip_antialias=True)):
        m = ovss.create("freeda", models="tiny", device="cpu", bank=str(bank_dir), k=10, **opts)
        s = m.score_crop(crop, names)
        assert s.shape == base.shape and torch.isfinite(s).all() and not torch.allclose(s, base), opts
    image_scope = ovss.create("freeda", models="tiny", device="cpu", bank=str(bank_dir), k=10, global_scope="image",
                              short_side=None, crop=48, stride=24)
    with pytest.raises(ValueError, match="global_scope"):
        image_scope.score_crop(crop, names)
    assert image_scope.segment(_image(7, (48, 80)), names).labels.shape == (48, 80)
    with pytest.raises(ValueError, match="needs a bank"):
        ovss.create("freeda", models="tiny", device="cpu")
    with pytest.raises(ValueError, match="aggregation"):
        ovss.create("freeda", models="tiny", device="cpu", bank=str(bank_dir), aggregation="median")


def test_bank_with_other_widths_is_refused(tmp_path):
    e = Entries(torch.randn(3, 8), F.normalize(torch.randn(3, 5), dim=-1), torch.arange(3), torch.rand(3),
                ["a", "b", "c"], ["1", "2", "3"])
    write_bank(iter([e]), tmp_path, {})
    with pytest.raises(ValueError, match="5-d keys"):
        ovss.create("freeda", models="tiny", device="cpu", bank=str(tmp_path))


# -- end to end: captions -> bank -> index -> segmentation -------------------------------------------------------


def test_build_index_segment_end_to_end(tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_text("A red cat sleeping on a blue bed.\nTwo dogs on the grass under the sky.\n"
                    "A cat and a dog on a sofa.\nA boat on the water near a house.\n")
    bank = tmp_path / "bank"
    assert main(["bank", "build", "--captions", str(caps), "-o", str(bank), "--models", "tiny", "--device", "cpu",
                 "--set", "steps=2", "--set", "resolution=64", "--batch-size", "2"]) == 0
    assert (bank / "index.faiss").is_file()
    m = ovss.create("freeda", models="tiny", device="cpu", bank=str(bank), short_side=64, crop=48, stride=24)
    assert m.paper_protocol == "tcl" and m.index.kind == "flat"
    img = _image(8, (60, 80))
    names = ["cat", "dog", "sky"]
    seg = m.segment(img, names, background=False)
    assert seg.labels.shape == (60, 80) and seg.classes == names
    assert seg.scores_lowres.shape == (3, 64, 85)  # short side 64 at 60×80
    assert set(np.unique(seg.labels)) <= {0, 1, 2}
    retrieved = m.vocabulary(names).stats["cat"]["retrieved"]
    assert 0 < retrieved <= len(m.bank)  # fewer rows than K: every row retrieved
    again = m.segment(img, names, background=False)
    assert np.array_equal(seg.labels, again.labels) and np.array_equal(seg.scores_lowres, again.scores_lowres)
    out = tmp_path / "out"
    img.save(tmp_path / "img.png")
    assert main(["segment", str(tmp_path / "img.png"), "-m", "freeda", "-c", "cat,dog", "--models", "tiny",
                 "--device", "cpu", "--set", f"bank={bank}", "--set", "short_side=64", "-o", str(out)]) == 0
    assert any(out.iterdir())
