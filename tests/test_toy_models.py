"""The toy world's models: training entry points, export layout, loaders, the binding probe, and (when the
trained models are installed) that FA-Seg on them segments better than the trivial rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovss.models.loading import TOY_DIR, load_component
from ovss.models.presets import PRESETS, TOY_PRESETS, ModelSet
from ovss.diffusion.text import tokenize_prompts
from ovss.models.tiny import blip_vocab
from ovss.text.clip_bpe import clip_tokenizer
from ovss.toy import TOY_CLASSES, iter_scenes, make_scene
from ovss.toy import models as M
from ovss.toy import probe, train

EXPORTED = [TOY_DIR / f for f in train.TOY_FOLDERS]
needs_toy = pytest.mark.skipif(not all((f / "README.md").exists() for f in EXPORTED),
                               reason="toy models not exported yet (python -m ovss.toy.train export)")


# -- pieces with a formula ---------------------------------------------------------------------------

def test_class_tokens_find_every_spelling_including_two_token_plurals():
    tok = clip_tokenizer()
    finder = train.ClassTokens(tok)
    ids = tokenize_prompts(tok, ["two pink triangles and a ball on the grass", ""])
    w = finder.weights(ids)
    row = ids[0].tolist()
    tri = [i for i, t in enumerate(row) if t in tok("triangles", add_special_tokens=False)["input_ids"]]
    assert len(tri) == 2  # "triangles" is two CLIP tokens
    c = TOY_CLASSES.index("triangle")
    assert torch.allclose(w[0, c, tri], torch.full((2,), 0.5)) and w[0, c].sum() == pytest.approx(1.0)
    named = {TOY_CLASSES[k] for k in torch.nonzero(w[0].sum(-1)).flatten().tolist()}
    assert named == {"triangle", "ball", "grass"}
    assert w[1].sum() == 0  # the empty prompt names nothing


def test_attention_region_loss_is_minus_log_of_the_mass_inside():
    # One item, one class word at token 1, a 2x2 attention grid: masses (0.1, 0.2, 0.3, 0.4) over queries.
    maps = torch.zeros(1, 4, 3)
    maps[0, :, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    weights = torch.zeros(1, len(TOY_CLASSES), 3)
    c = TOY_CLASSES.index("ball")
    weights[0, c, 1] = 1.0
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = c  # the ball fills the top-left cell only
    loss = train.attention_region_loss({2: maps}, weights, labels, torch.tensor([True]))
    assert float(loss) == pytest.approx(-math.log(0.1 / 1.0), rel=1e-5)
    labels[0, :2, :] = c  # now the whole top row: cells 0 and 1
    loss = train.attention_region_loss({2: maps}, weights, labels, torch.tensor([True]))
    assert float(loss) == pytest.approx(-math.log(0.3), rel=1e-5)
    assert float(train.attention_region_loss({2: maps}, weights, labels, torch.tensor([False]))) == 0.0


def test_caption_prior_stacks_named_stuff_top_down():
    prior = probe.caption_prior("a red ball on the grass under a blue sky", (4, 2))
    assert prior[:2].tolist() == [[TOY_CLASSES.index("sky")] * 2] * 2
    assert prior[2:].tolist() == [[TOY_CLASSES.index("grass")] * 2] * 2
    assert not probe.caption_prior("a red ball on the grass under a blue sky", (4, 2), sense="toy").any()


def test_toy_blip_vocabulary_keeps_shipped_ids_and_spells_toy_words_whole():
    vocab = M.toy_blip_vocab()
    assert all(vocab[t] == i for t, i in blip_vocab().items())
    tok = M.toy_blip_tokenizer()
    for caption in (make_scene(s).caption for s in range(40)):
        assert not any(t.startswith("##") or t == "[UNK]" for t in tok.tokenize(caption)), caption


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = train.RunConfig(kind="clip", steps=1000, lr=1e-3, warmup=100)
    assert train.lr_at(0, cfg) == pytest.approx(1e-5)
    assert train.lr_at(99, cfg) == pytest.approx(1e-3)
    assert train.lr_at(1000, cfg) == pytest.approx(1e-4)


# -- training entry points, export and loading (tiny runs) ---------------------------------------------

@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every entry point for 2 steps on 2 scenes, then an export: into a temporary folder, never the package."""
    out = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    for kind in ("clip", "vae", "unet", "rf_unet", "blip"):
        train.main([kind, "--steps", "2", "--scenes", "2", "--out", str(out), "--threads", "1", "--log-every", "1"])
    dest = out / "toy"
    train.main(["export", "--out", str(out), "--dest", str(dest)])
    return out, dest


def test_smoke_runs_write_checkpoints_meta_and_resume(smoke_runs):
    out, _ = smoke_runs
    for kind in ("clip", "vae", "unet", "rf_unet", "blip"):
        meta = (out / kind / "meta.json").read_text()
        assert '"steps_done": 2' in meta and (out / kind / "ckpt.pt").exists()
    before = torch.load(out / "clip" / "ckpt.pt", weights_only=False)
    train.main(["clip", "--steps", "3", "--scenes", "2", "--out", str(out), "--resume", "--threads", "1",
                "--freeze-text"])
    after = torch.load(out / "clip" / "ckpt.pt", weights_only=False)
    assert before["step"] == 2 and after["step"] == 3 and len(after["history"]) == 3
    assert after["history"][:2] == before["history"]
    # --freeze-text: the text tower (which the UNets were trained with) is untouched, the vision tower moves.
    for name, value in before["model"].items():
        same = torch.equal(value, after["model"][name])
        if name.startswith("text_model."):
            assert same, name
    assert not torch.equal(before["model"]["visual_projection.weight"], after["model"]["visual_projection.weight"])


def test_blip_prompt_targets_start_with_diffsegmenters_prefix():
    rng = np.random.default_rng(0)
    pairs = [train.blip_target("a photo of a red ball on the grass", ["grass", "ball"], rng) for _ in range(200)]
    prompted = [(p, t) for p, t in pairs if p]
    assert 0.15 < len(prompted) / len(pairs) < 0.45
    for p, t in prompted:
        assert p in ("a photograph of grass", "a photograph of ball") and t == p + " a red ball on the grass"
    assert all(t == "a photo of a red ball on the grass" for p, t in pairs if not p)


def test_export_layout_loads_through_the_normal_loaders(smoke_runs):
    _, dest = smoke_runs
    dm = load_component("diffusion", str(dest / "diffusion"))
    assert dm.native_resolution == 64 and dm.vae_factor == 4 and len(dm.tokenizer) == 49408
    assert dm.vae_scale != 1.0  # measured, not the default
    assert dm.scheduler.config.beta_schedule == "scaled_linear"
    for kind, folder in (("clip", "clip"), ("blip", "blip"), ("diffusion", "diffusion_rf")):
        load_component(kind, str(dest / folder))
    weights = [p for p in (dest / "diffusion" / "unet").iterdir() if p.suffix == ".safetensors"]
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(weights[0]).values()} == {torch.float16}
    assert (dest / "diffusion_rf" / "README.md").read_text().count("InstaFlow") >= 1


def test_exported_text_encoders_equal_the_clip_text_tower(smoke_runs):
    _, dest = smoke_runs
    _assert_text_towers_equal(dest)


def test_probe_numbers_are_in_range(smoke_runs):
    _, dest = smoke_runs
    dm = load_component("diffusion", str(dest / "diffusion"))
    scenes = list(iter_scenes("val", 3))
    for objective in ("eps", "rf"):
        r = probe.binding_probe(dm, scenes, objective=objective)
        assert r["n_scenes"] == 3 and r["n_things"] >= 3 and r["n_stuff"] >= 3
        for key in ("things", "things_chance", "stuff", "stuff_chance"):
            assert 0.0 <= r[key] <= 1.0
    b = probe.baselines(scenes, "toy")
    assert all(0.0 <= v <= 100.0 for v in b.values())


# -- the shipped models ------------------------------------------------------------------------------

def _assert_text_towers_equal(root):
    clip = load_component("clip", str(root / "clip"))
    for folder in ("diffusion", "diffusion_rf"):
        te = load_component("diffusion", str(root / folder)).text_encoder.state_dict()
        tower = clip.model.text_model.state_dict()
        assert te.keys() == tower.keys()
        assert all(torch.equal(te[k], tower[k]) for k in te), folder


@needs_toy
def test_shipped_toy_models_load_for_every_method_role():
    for method in ("faseg", "diffsegmenter"):
        ms = ModelSet(method, "toy")
        for role in PRESETS[method]:
            assert ms[role] is not None
        if method == "faseg":
            assert ms["diffusion"].source.endswith(TOY_PRESETS["faseg"]["diffusion"])


@needs_toy
def test_shipped_text_encoders_equal_the_clip_text_tower():
    _assert_text_towers_equal(TOY_DIR)


@needs_toy
def test_faseg_on_toy_models_beats_all_background():
    torch.set_num_threads(1)
    scenes = list(iter_scenes("val", 8))
    r = probe.evaluate_method("faseg", scenes, sense="toy", models="toy", resolution=64, taus=())
    assert r["miou"] > r["baselines"]["all_background"] + 5, r
