"""OVDiff: token spans, masks, prototypes, K-means, stuff filter, matching, category filter, extractors, end to end."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovss
from ovss.banks.prototypes import ClassPrototypes, PrototypeCache
from ovss.dense.kmeans import kmeans
from ovss.dense.sam import box_nms, sam_instances
from ovss.features import IMAGENET_MEAN, IMAGENET_STD, clip_keys, unet_queries, vit_keys
from ovss.methods import ovdiff as od
from ovss.models import build_tiny
from ovss.models import tiny as tiny_models
from ovss.text.clip_bpe import clip_tokenizer

#: everything small enough for a CPU test; the algorithm is the paper's
SMALL = dict(n_support=4, support_batch=2, steps=2, support_size=64, k_parts=4, short_side=64, windows=(64, 48),
             stride=32, sd_window_size=64, clip_window_size=64, dino_max_side=64, dino_long_cap=128)


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    return ovss.create("ovdiff", models="tiny", cache_dir=str(tmp_path_factory.mktemp("ovdiff_cache")), **SMALL)


def _image(seed: int, hw=(70, 90)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(*hw, 3) * 255).astype(np.uint8))


# -- prompt tokens ------------------------------------------------------------------------------------------
def test_token_positions_multi_token_and_first_occurrence():
    tok = clip_tokenizer()
    prompt = od.SUPPORT_PROMPT.format("potted plant")
    pos = od.target_token_positions(tok, prompt, "potted plant")
    ids = tok(prompt)["input_ids"]
    assert pos == [6, 7]  # BOS a good picture of a | potted plant
    assert [ids[p] for p in pos] == tok("potted plant", add_special_tokens=False)["input_ids"]
    # "picture frame" attaches to the "picture" of the template (first occurrence, trap 3)
    assert od.target_token_positions(tok, od.SUPPORT_PROMPT.format("picture frame"), "picture frame") == [3, 4]


# -- attribution and masks ----------------------------------------------------------------------------------
def test_normalise_attribution_ranges_and_constant_map():
    a = torch.rand(3, 8, 8) * 5 + 2
    a[2] = 1.0  # constant: the 1e-6 clamp gives zeros instead of NaN
    a64, a512 = od.normalise_attribution(a, 32)
    assert a512.shape == (3, 32, 32)
    for m in (a64[:2], a512[:2]):
        assert torch.allclose(m.amin(dim=(1, 2)), torch.zeros(2)) and torch.allclose(m.amax(dim=(1, 2)), torch.ones(2))
    assert torch.equal(a64[2], torch.zeros(8, 8)) and torch.isfinite(a512).all()


def test_multiotsu_thresholds_ordered_and_fallback():
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.rand(200, generator=g) * 0.2, 0.45 + torch.rand(200, generator=g) * 0.1,
                   0.8 + torch.rand(200, generator=g) * 0.2]).reshape(6, 10, 10)
    t_bg, t_fg = od.multiotsu_thresholds(a)
    assert 0.19 <= t_bg < 0.45 and 0.54 <= t_fg < 0.8  # between the three groups, up to the 256-bin histogram
    assert od.multiotsu_thresholds(torch.full((2, 4, 4), 0.3)) == (od.BG_FIXED, od.FG_FIXED)
    fg, bg = od.attention_masks(a, (t_bg, t_fg))
    assert torch.equal(fg, a > t_fg) and torch.equal(bg, a < t_bg)


def _restated_instance_rule(instances, a, refine):
    masks = [~instances.any(0)] + list(instances)
    weights = [float((m.float() * a).sum() / m.float().sum()) if m.any() else 0.0 for m in masks]
    order = sorted(range(len(masks)), key=lambda i: -weights[i])  # stable: ties keep stack order
    h, w = a.shape
    winner = torch.zeros(h, w, dtype=torch.long)
    for y in range(h):
        for x in range(w):
            vals = [float(masks[i][y, x]) * weights[i] for i in order]
            winner[y, x] = vals.index(max(vals))
    fg = winner == 0
    bg = winner == int(winner.max())
    if refine:
        bg = bg & (a < 0.2)
        pad = F.pad(bg[None, None].float(), (1, 1, 1, 1), value=1.0)[0, 0] > 0
        bg = torch.stack([pad[1:-1, 1:-1], pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]]).all(0)
    return fg, bg


def test_instance_weighting_rule_on_synthetic_stacks():
    h = w = 16
    a = torch.zeros(h, w)
    a[4:10, 4:10] = 0.9
    a[12:, :] = 0.05
    a[0:3, :] = 0.3
    inst = torch.zeros(3, h, w, dtype=torch.bool)
    inst[0, 3:11, 3:11] = True  # the object: highest mean attribution
    inst[1, 11:, :] = True  # low-attribution ground
    inst[2, 0:3, 0:8] = True  # mid region
    fg, bg = od.instance_masks(inst, a, bg_refine=True)
    want_fg, want_bg = _restated_instance_rule(inst, a, True)
    assert torch.equal(fg, want_fg) and torch.equal(bg, want_bg)
    assert fg[5, 5] and not fg[13, 5] and bg[14, 5] and not bg[11, 5]  # eroded at the top edge of the ground
    fg2, bg2 = od.instance_masks(inst, a, bg_refine=False)
    assert torch.equal(bg2, _restated_instance_rule(inst, a, False)[1]) and bg2[11, 5]
    # no instance at all: the fixed 0.5 / 0.2 thresholds (or the given fallback)
    fg0, bg0 = od.instance_masks(torch.zeros(0, h, w, dtype=torch.bool), a)
    assert torch.equal(fg0, a > 0.5) and torch.equal(bg0, a < 0.2)
    fg1, _ = od.instance_masks(torch.zeros(0, h, w, dtype=torch.bool), a, fallback=(0.1, 0.25))
    assert torch.equal(fg1, a > 0.25)


def test_box_nms_suppresses_overlaps_by_score():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 5, 10]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.8, 0.7])
    # box 1 (best) suppresses box 0 (IoU 0.81); box 3 overlaps box 1 by 36/(81+50-36) = 0.38 < 0.7
    assert box_nms(boxes, scores, 0.7).tolist() == [1, 2, 3]
    assert box_nms(boxes, scores, 0.3).tolist() == [1, 2]


def test_sam_proposer_returns_binary_instances():
    sam = build_tiny("sam")
    masks = sam_instances(sam, _image(0, (64, 64)), points_per_side=3, pred_iou_thresh=-1e9,
                          stability_thresh=-1.0, nms_thresh=1.0)
    assert masks.dtype == torch.bool and masks.shape[1:] == (64, 64) and 1 <= masks.shape[0] <= 27
    assert masks.flatten(1).any(1).all()
    strict = sam_instances(sam, _image(0, (64, 64)), points_per_side=3, pred_iou_thresh=1e9)
    assert strict.shape == (0, 64, 64)


# -- prototypes ---------------------------------------------------------------------------------------------
def test_downsampled_masks_bilinear_nonzero_contains_nearest():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(5, 64, 64, generator=g) > 0.93
    lin = od.downsample_masks(masks, (8, 8), "bilinear")
    near = od.downsample_masks(masks, (8, 8), "nearest")
    assert (lin | ~near).all() and lin.sum() > near.sum()


def test_class_prototype_is_size_weighted_mean_of_instances():
    g = torch.Generator().manual_seed(2)
    fg = [torch.randn(n, 6, generator=g) for n in (5, 17, 2)]
    bg = [torch.randn(4, 6, generator=g), torch.zeros(0, 6), torch.randn(9, 6, generator=g)]
    p = od.class_prototypes(fg, bg, dim=6, k_parts=4)
    sizes = torch.tensor([5.0, 17.0, 2.0])
    assert torch.allclose(p.fg_mean[0], (p.fg_inst * sizes[:, None]).sum(0) / sizes.sum(), atol=1e-6)
    assert p.fg_inst.shape == (3, 6) and p.bg_inst.shape == (2, 6)  # the empty bg image gives a NaN row: dropped
    assert torch.isfinite(p.bg_inst).all()
    assert p.fg_parts.shape == (4, 6) and p.bg_parts.shape == (4, 6)
    tiny = od.class_prototypes([torch.randn(2, 6)], [], dim=6, k_parts=32)  # fewer vectors than K
    assert tiny.fg_parts.shape == (2, 6) and tiny.bg_mean.shape == (0, 6)


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 3, generator=g) for c in centres])
    r = kmeans(x, 4, seed=0)
    assert r.centers.shape == (4, 3) and r.labels.shape == (200,)
    found = sorted(r.centers.round().tolist())
    assert found == sorted(centres.tolist())
    # each true cluster is one label, and the inertia is the sum of squared distances to the centres
    assert all(len(set(r.labels[i * 50:(i + 1) * 50].tolist())) == 1 for i in range(4))
    assert r.inertia == pytest.approx(float(((x - r.centers[r.labels]) ** 2).sum()), rel=1e-5)
    r2 = kmeans(x, 4, seed=0)
    assert torch.equal(r.centers, r2.centers)
    with pytest.raises(ValueError):
        kmeans(x[:3], 4)


def _protos(fg: torch.Tensor, bg: torch.Tensor) -> ClassPrototypes:
    d = fg.shape[1]
    return ClassPrototypes(fg[:1], fg[1:], torch.zeros(0, d), bg[:1], bg[1:], torch.zeros(0, d))


def test_stuff_filter_rules():
    g = torch.Generator().manual_seed(4)
    sky_fg = torch.randn(3, 8, generator=g)
    cat_bg = torch.cat([sky_fg[1:2] * 2.0, torch.randn(2, 8, generator=g)])  # row 0 = a scaled sky fg prototype
    cat = _protos(torch.randn(2, 8, generator=g), cat_bg)
    sky = _protos(sky_fg, torch.randn(3, 8, generator=g))
    no_filter = od.assemble_prototypes([cat, sky], [False, False])
    assert no_filter.valid[0, 0].sum() == 3 and no_filter.valid[0, 1].sum() == 3  # no stuff class: a no-op
    bank = od.assemble_prototypes([cat, sky], [False, True])
    assert bank.valid[0, 0].sum() == 2  # the bg prototype equal to a stuff fg prototype is gone
    assert bank.valid[0, 1].sum() == 0  # stuff classes bring no bg prototypes
    kept = torch.cat([cat_bg[1:]])
    assert torch.allclose(bank.protos[0, 0, :2], F.normalize(kept, dim=-1), atol=1e-6)
    assert torch.allclose(bank.protos.norm(dim=-1)[bank.valid], torch.ones(int(bank.valid.sum())), atol=1e-5)
    single = od.assemble_prototypes([cat, sky], [False, True], kinds=("mean",))  # one bg prototype: kept
    assert single.valid[0, 0].sum() == 1
    loose = od.assemble_prototypes([cat, sky], [False, True], threshold=1.01)
    assert loose.valid[0, 0].sum() == 3
    with_stuff_bg = od.assemble_prototypes([cat, sky], [False, True], stuff_bg=True)
    assert with_stuff_bg.valid[0, 1].sum() == 3


def _restated_match(feats, bank, selected, filter_bg=True):
    d, h, w = feats.shape
    n_classes = bank.protos.shape[1]
    out = torch.empty(1 + n_classes, h, w)
    for y in range(h):
        for x in range(w):
            f = feats[:, y, x] / feats[:, y, x].norm().clamp(min=1e-6)
            best_bg = -1.0
            for c in range(n_classes):
                best_fg = -1.0
                for n in range(bank.protos.shape[2]):
                    cos_fg = float(bank.protos[1, c, n] @ f)
                    if bank.valid[1, c, n] and selected[c]:
                        best_fg = max(best_fg, cos_fg)
                    cos_bg = float(bank.protos[0, c, n] @ f)
                    if bank.valid[0, c, n] and (selected[c] or not filter_bg):
                        best_bg = max(best_bg, cos_bg)
                out[1 + c, y, x] = best_fg
            out[0, y, x] = best_bg
    return out


def test_matching_rule_against_restatement():
    g = torch.Generator().manual_seed(5)
    per_class = [ClassPrototypes(torch.randn(1, 6, generator=g), torch.randn(n, 6, generator=g), torch.zeros(0, 6),
                                 torch.randn(1, 6, generator=g), torch.randn(m, 6, generator=g), torch.zeros(0, 6))
                 for n, m in ((3, 2), (1, 4), (2, 0))]
    bank = od.assemble_prototypes(per_class, [False, False, False], stuff_filter=False)
    feats = torch.randn(6, 3, 4, generator=g)
    selected = torch.tensor([True, False, True])
    got = od.match_scores(feats, bank, selected)
    assert torch.allclose(got, _restated_match(feats, bank, selected), atol=1e-5)
    assert (got[2] == -1).all()  # an unselected class scores -1 everywhere
    loose = od.match_scores(feats, bank, selected, filter_bg=False)
    assert torch.allclose(loose, _restated_match(feats, bank, selected, filter_bg=False), atol=1e-5)
    assert od.match_scores(feats, bank, selected, background=False).shape == (3, 3, 4)


def test_final_decision_zeroes_negatives_and_ties_go_to_background():
    scores = torch.tensor([[-0.5, 0.2, 0.3, 0.0], [-0.1, 0.6, 0.3, -0.2], [-0.3, 0.1, 0.1, -0.4]])[:, None, :]
    labels = od.decide(scores, 0.0)[0]
    assert labels.tolist() == [0, 1, 0, 0]  # all negative -> bg; tie at 0.3 -> bg; zero bg vs negatives -> bg
    assert od.decide(scores, None)[0].tolist() == [1, 1, 0, 0]


# -- category filter ----------------------------------------------------------------------------------------
def test_subset_prompts():
    subsets = od.subset_prompts(["cat", "dog", "sofa"])
    assert len(subsets) == 2 ** 3 - 1
    assert ([0, 2], "a cat and a sofa") in subsets and ([0, 1, 2], "a cat and a dog and a sofa") in subsets


def test_category_filter_never_empty_and_keeps_stuff():
    clip = build_tiny("clip")
    names = ["cat", "dog", "sofa", "sky", "tree", "car"]
    stuff = [False, False, False, True, False, False]
    for seed in range(3):
        kept = od.category_filter(clip, _image(seed), names, stuff, filter_size=64)
        assert kept and 3 in kept and kept == sorted(kept)
        capped = od.category_filter(clip, _image(seed), names, stuff, eta=1, filter_size=64)
        assert len([i for i in capped if not stuff[i]]) == 1 and 3 in capped
    assert od.category_filter(clip, _image(0), ["sky", "wall"], [True, True]) == [0, 1]


# -- feature extractors -------------------------------------------------------------------------------------
def test_sd_noise_constants_at_t200():
    dm = build_tiny("diffusion")  # the SD-1.x scaled-linear schedule
    alpha = float(dm.scheduler.alphas_cumprod[od.SD_TIMESTEP])
    assert alpha ** 0.5 == pytest.approx(0.8682, abs=1e-4) and (1 - alpha) ** 0.5 == pytest.approx(0.4963, abs=1e-4)


#: OVDiff's SD extractor: its layers, t = 200 and noise seed
SD = {"layers": od.SD_LAYERS, "timestep": od.SD_TIMESTEP, "noise_seed": od.SD_NOISE_SEED}


def test_sd_features_seeded_and_layered(method):
    dm = method.models["diffusion"]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    a = unet_queries(dm, x, **SD)
    assert torch.equal(a, unet_queries(dm, x, **SD))
    # every layer's to_q width, concatenated at the 8x8 latent grid
    widths = [dm.unet.get_submodule(f"{n}.transformer_blocks.0.attn2.to_q").out_features for n in od.SD_LAYERS]
    assert a.shape == (2, sum(widths), 8, 8)
    one = unet_queries(dm, x[1:], **SD)
    # per-image seed: order- and batch-independent (up to float summation order: 2.6e-4 on queries of size ~12)
    assert torch.allclose(one[0], a[1], rtol=1e-4, atol=1e-3)
    assert not torch.allclose(unet_queries(dm, x, **{**SD, "noise_seed": 44}), a, atol=1e-4)
    with pytest.raises(ValueError):
        unet_queries(dm, x, **{**SD, "layers": ("down_blocks.3.attentions.0",)})


def test_vit_keys_match_layernormed_block_inputs(method):
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(7))
    dino = method.models["dino"].model
    keys = vit_keys(method.models["dino"], x)
    norm = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    hs = dino(pixel_values=norm, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
    last = dino.layers[-1]
    want = last.attention.k_proj(last.layernorm_before(hs[-2]))[:, 1:]
    assert keys.shape == (1, want.shape[-1], 8, 6)
    assert torch.allclose(keys.flatten(2).transpose(1, 2), want, atol=1e-5)
    clip = method.models["clip"].model
    ck = clip_keys(method.models["clip"], torch.rand(1, 3, 64, 64), layer=10)
    assert ck.shape == (1, clip.config.vision_config.hidden_size, 4, 4)


# -- end to end -------------------------------------------------------------------------------------------
def _fresh_cache(method, root) -> None:
    method.cache = PrototypeCache(root)
    method._class_protos.clear()
    method._banks.clear()


def test_end_to_end_tiny_vocabulary(method, tmp_path, monkeypatch):
    _fresh_cache(method, tmp_path)
    calls = []
    real = od.sample
    monkeypatch.setattr(od, "sample", lambda *a, **k: calls.append(a[1][0]) or real(*a, **k))
    monkeypatch.setattr(tiny_models, "build_tiny", functools.lru_cache(maxsize=None)(tiny_models.build_tiny))
    seg = method.segment(_image(1), ["cat", "dog", "sky"])
    assert seg.classes == ["background", "cat", "dog", "sky"]
    assert seg.labels.shape == (70, 90) and seg.scores_lowres.shape == (4, 64, 82)
    assert set(np.unique(seg.labels)) <= {0, 1, 2, 3}
    assert np.abs(seg.scores_lowres).max() <= 1.0 + 1e-6
    assert seg.meta["selected"] and "sky" in seg.meta["selected"]  # stuff bypasses the filter
    assert len(calls) == 3
    again = method.segment(_image(1), ["cat", "dog", "sky"])
    assert np.array_equal(again.labels, seg.labels) and np.allclose(again.scores_lowres, seg.scores_lowres)
    # another vocabulary and a new segmenter on the same cache: only the new class is built
    other = ovss.create("ovdiff", models="tiny", cache_dir=str(tmp_path), **SMALL)
    seg2 = other.segment(_image(2), ["dog", "tree"], background=False)
    assert seg2.classes == ["dog", "tree"] and calls[3:] == ["A good picture of a tree"]
    given = method.segment(_image(1), ["cat", "dog", "sky"], given=["dog"])
    assert given.meta["selected"] == ["dog"] and set(np.unique(given.labels)) <= {0, 2}


def test_threshold_background_and_options(method, tmp_path):
    _fresh_cache(method, tmp_path)
    seg = method.segment(_image(3), ["cat", "dog"], bg_threshold=2.0)  # prototypes mode ignores it
    assert seg.classes[0] == "background"
    cfg = dict(SMALL, background="threshold", windows=(), feature_extractors=("dino",), category_filter=False,
               build_missing=False)
    m = ovss.create("ovdiff", models="tiny", cache_dir=str(tmp_path), **cfg)
    hi = m.segment(_image(3), ["cat", "dog"], bg_threshold=1.0)  # cosine never exceeds 1: all background
    assert (hi.labels == 0).all() and np.allclose(hi.scores_lowres[0], 1.0)
    lo = m.segment(_image(3), ["cat", "dog"], bg_threshold=-1.0)
    assert (lo.labels > 0).all()
    with pytest.raises(ValueError):
        ovss.create("ovdiff", models="tiny", windows=(), whole_image_window=False)
