"""FreeDA's offline stage: bank format, shards, resume, merge, index, retrieval, converter, and the CLI.

Builds use tiny random-weight models, 64-px images and 2 denoising steps; synthetic banks are written
directly for the retrieval checks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovss.banks import build as build_mod
from ovss.banks.bank import (Bank, BankError, Entries, ShardWriter, find_shards, merge_shards,
                             shard_dir, shard_range, write_bank)
from ovss.banks.build import (BuildConfig, Builder, Caption, build_local, build_shard, caption_seed, make_models,
                              masked_prototype, mix_keys, noun_token_positions, read_captions, weak_mask)
from ovss.banks.index import KeyIndex, brute_force_search, build_index, open_index
from ovss.banks.storage import parse_shard
from ovss.cli import main
from ovss.text.clip_bpe import clip_tokenizer
from ovss.text.nouns import caption_nouns, singular

faiss = pytest.importorskip("faiss")

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs sitting on a red couch next to a window.",
    "The cat is sleeping on the bed.",
    "A plate of food with broccoli and carrots.",
    "A giraffe standing in a field under a blue sky.",
    "Very quickly and slowly.",  # no noun: a caption that yields no entry still counts as finished
]
FAST = dict(steps=2, resolution=64, batch_size=2, chunk_rows=1)


@pytest.fixture(scope="module")
def models():
    return make_models("tiny", "cpu")


@pytest.fixture(scope="module")
def captions() -> list[Caption]:
    return [Caption(f"L{i + 1}", c) for i, c in enumerate(CAPTIONS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models, captions) -> Path:
    """An uninterrupted single-process build."""
    out = tmp_path_factory.mktemp("ref")
    _, bank = build_local(captions, out, BuildConfig(**FAST), models)
    return bank


# -- shards and settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,align", [(10, 3, 1), (10, 3, 4), (7, 7, 2), (3, 5, 1), (64, 2, 4)])
def test_shard_ranges_tile_the_captions_on_aligned_boundaries(n, k, align):
    ranges = [shard_range(n, i, k, align) for i in range(k)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c and a <= b
    assert all(a % align == 0 for a, _ in ranges)


def test_parse_shard():
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/2", "a/b", "3"):
        with pytest.raises(ValueError):
            parse_shard(bad)


# -- the per-caption arithmetic of spec §3 ----------------------------------------------------------------


def test_weak_mask_is_sigmoid_of_minmax_to_minus_one_one_above_gamma():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.rand(16, 16, generator=gen) ** 3 * 7
        mm = (a - a.min()) / (a.max() - a.min())
        mask = weak_mask(a, 0.45)
        assert torch.equal(mask, torch.sigmoid(mm * 2 - 1) > 0.45)
        # The equivalent threshold on the [0, 1] map (trap 7): mm > (ln(0.45/0.55) + 1) / 2 = 0.39966.
        threshold = (math.log(0.45 / 0.55) + 1) / 2
        away = (mm - threshold).abs() > 1e-6
        assert torch.equal(mask[away], (mm > threshold)[away])
    assert weak_mask(torch.full((4, 4), 0.3)) is None


def test_masked_prototype_is_the_weighted_mean_of_bilinearly_resampled_mask():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(5, 5, 3, generator=gen)
    mask = torch.zeros(17, 17, dtype=torch.bool)
    mask[3:11, 6:15] = True
    # align_corners=True samples the mask at i·(17−1)/(5−1) = 4i exactly: the weights are the mask's values there.
    w = mask[::4, ::4].float()
    expected = (feats * w[..., None]).sum((0, 1)) / w.sum()
    assert torch.allclose(masked_prototype(feats, mask), expected, atol=1e-6)
    # A mask between the sample points gives zero weight everywhere: no entry.
    between = torch.zeros(17, 17, dtype=torch.bool)
    between[1:3, 1:3] = True
    assert masked_prototype(feats, between) is None


def test_keys_mix_normalised_embeddings():
    gen = torch.Generator().manual_seed(2)
    t, c = torch.randn(4, 8, generator=gen) * 3, torch.randn(4, 8, generator=gen)
    k = mix_keys(t, c, 0.9)
    assert torch.allclose(k.norm(dim=-1), torch.ones(4), atol=1e-6)
    expected = 0.9 * F.normalize(t, dim=-1) + 0.1 * F.normalize(c, dim=-1)
    assert torch.allclose(k, F.normalize(expected, dim=-1), atol=1e-6)
    assert torch.allclose(mix_keys(t, c, 1.0), F.normalize(t, dim=-1), atol=1e-6)
    assert torch.allclose(mix_keys(t, c, 0.0), F.normalize(c, dim=-1), atol=1e-6)
    assert torch.allclose(mix_keys(t, c, 0.9, prenorm=False), F.normalize(0.9 * t + 0.1 * c, dim=-1), atol=1e-6)


def test_noun_token_positions_with_the_real_clip_vocabulary():
    tok = clip_tokenizer()
    caption = "a skateboarder and a skateboarder near a giraffe"
    piece = tok("skateboarder", add_special_tokens=False)["input_ids"]
    ids = tok(caption)["input_ids"]  # BOS at 0
    pos = noun_token_positions(tok, caption, "skateboarder")
    assert len(pos) == 2 * len(piece) and len(piece) > 1  # multi-token noun, both occurrences
    first = pos[:len(piece)]
    assert first == list(range(first[0], first[0] + len(piece))) and first[0] >= 1
    assert [ids[p] for p in pos] == piece * 2
    with pytest.raises(ValueError, match="does not occur"):
        noun_token_positions(tok, caption, "zebra")
    long = "a cat " + "very " * 80 + "dog"
    assert noun_token_positions(tok, long, "dog") == []  # past the 77-token window


def test_rule_based_nouns():
    assert caption_nouns("A man riding a wave on top of a surfboard.") == ["man", "wave", "surfboard"]
    assert caption_nouns("Two dogs sitting on a red couch next to a window.") == ["dogs", "couch", "window"]
    assert caption_nouns("People walk in the park near a stop sign.") == ["people", "park", "stop", "sign"]
    assert caption_nouns("A man rides a horse and the horse eats.") == ["man", "horse"]
    assert caption_nouns("Very quickly and slowly.") == []
    assert [singular(w) for w in ("dogs", "people", "boxes", "berries", "glasses", "bus")] == [
        "dog", "person", "box", "berry", "glass", "bus"]


def test_read_captions_formats(tmp_path):
    coco = {"annotations": [{"image_id": 9, "id": 5, "caption": "b  dog"}, {"image_id": 3, "id": 7, "caption": "c"},
                            {"image_id": 9, "id": 2, "caption": "a cat"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert read_captions(tmp_path / "c.json") == [Caption("3_0", "c"), Caption("9_0", "a cat"), Caption("9_1", "b dog")]
    (tmp_path / "c.jsonl").write_text('{"id": "x", "text": "one"}\n\n{"id": 4, "caption": "two"}\n')
    assert read_captions(tmp_path / "c.jsonl") == [Caption("x", "one"), Caption("4", "two")]
    (tmp_path / "c.txt").write_text("first\n\nsecond line\n")
    assert read_captions(tmp_path / "c.txt", limit=1) == [Caption("L1", "first")]
    (tmp_path / "d.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(ValueError, match="unique"):
        read_captions(tmp_path / "d.jsonl")


# -- building -------------------------------------------------------------------------------------------


def test_bank_rows_follow_captions_and_nouns(reference, captions):
    bank = Bank(reference)
    e = bank.entries()
    assert len(bank) == len(e) > 0
    # Every row belongs to a caption that mentions its noun, in caption order then noun order.
    expected = [(i, n) for i, c in enumerate(captions) for n in caption_nouns(c.text)]
    rows = list(zip(e.caption_index.tolist(), e.nouns))
    assert rows == [r for r in expected if r in rows]
    assert e.caption_ids == [captions[i].key for i in e.caption_index.tolist()]
    assert torch.allclose(e.keys.norm(dim=-1), torch.ones(len(e)), atol=1e-5)
    assert bool(((e.mask_area > 0) & (e.mask_area <= 1)).all())
    assert bank.proto_dim == 32 and bank.key_dim == 16  # tiny DINOv2 / CLIP widths
    assert sum(bank.noun_counts.values()) == len(e)
    bank.verify()


def test_builder_entries_match_a_restatement_of_the_spec(models, captions):
    """One caption through sample -> attribution -> mask -> DINOv2 pooling -> key, recomputed by hand."""
    cfg = BuildConfig(**FAST)
    cap = captions[2]  # "The cat is sleeping on the bed."
    entries = Builder(models, cfg).batch([cap], 7)
    dm, clip, dino = models["diffusion"], models["clip"], models["dinov2"]
    nouns = caption_nouns(cap.text)
    spans = [noun_token_positions(dm.tokenizer, cap.text, n) for n in nouns]
    res = build_mod.sample(dm, [cap.text], steps=2, guidance=7.5, scheduler="default",
                           seeds=[caption_seed(0, cap.key)], height=64, width=64, capture_cross=(1, 2, 4, 8),
                           token_positions=[sum(spans, [])], cross_size=(64, 64))
    x = F.interpolate(res.images, size=(518, 518), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    v = dino.model(pixel_values=x).last_hidden_state[0, 1:].reshape(37, 37, -1)
    start, protos, kept = 0, [], []
    for noun, span in zip(nouns, spans):
        a = res.cross[0][start:start + len(span)].mean(0)  # each scale upsampled once, straight to the image
        start += len(span)
        mm = (a - a.min()) / (a.max() - a.min())
        m = F.interpolate((torch.sigmoid(2 * mm - 1) > 0.45).float()[None, None], size=(37, 37), mode="bilinear",
                          align_corners=True)[0, 0]
        if m.sum() > 0:
            protos.append((v * m[..., None]).sum((0, 1)) / m.sum())
            kept.append(noun)
    assert entries.nouns == kept and entries.caption_index.tolist() == [7] * len(kept)
    assert torch.allclose(entries.prototypes, torch.stack(protos), atol=1e-5)

    def embed(texts):
        enc = clip.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return clip.model.get_text_features(**enc).pooler_output

    templates = cfg.templates
    t_hat = torch.stack([embed([t.format(n) for t in templates]).mean(0) for n in kept])
    c_hat = embed([cap.text]).expand(len(kept), -1)
    expected = F.normalize(0.9 * F.normalize(t_hat, dim=-1) + 0.1 * F.normalize(c_hat, dim=-1), dim=-1)
    assert torch.allclose(entries.keys, expected, atol=1e-5)


def test_resume_after_a_crash_redoes_no_finished_caption(tmp_path, monkeypatch, models, captions, reference):
    calls: list[list[str]] = []
    real = build_mod.sample

    def counting(dm, prompts, **kw):
        calls.append(list(prompts))
        if len(calls) == 2 and crash:
            raise KeyboardInterrupt("simulated kill")
        return real(dm, prompts, **kw)

    monkeypatch.setattr(build_mod, "sample", counting)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        build_local(captions, tmp_path, BuildConfig(**FAST), models)
    manifest = json.loads((shard_dir(tmp_path / "shards", 0, 1) / "manifest.json").read_text())
    assert manifest["data"]["done"] == 2 and not manifest["data"]["complete"]  # the first batch is on disk
    done_before = list(calls)
    crash, calls[:] = False, []
    build_local(captions, tmp_path, BuildConfig(**FAST), models)
    redone = {p for batch in calls for p in batch}
    assert not redone & {p for p in done_before[0]}  # finished captions are never generated again
    assert redone == {c.text for c in captions[2:] if caption_nouns(c.text)}
    for name in ("manifest.json", "part-00000.safetensors"):
        if name == "manifest.json":
            a, b = (json.loads((d / name).read_text()) for d in (tmp_path, reference))
            a["data"].pop("built_seconds"), b["data"].pop("built_seconds")
            assert a == b
        else:
            assert (tmp_path / name).read_bytes() == (reference / name).read_bytes()


def test_shards_merge_to_the_single_process_bank(tmp_path, models, captions, reference):
    cfg = BuildConfig(**FAST)
    for i in range(3):
        build_shard(captions, tmp_path / "shards", cfg, models, (i, 3))
    assert len(find_shards([tmp_path / "shards"])) == 3
    bank = merge_shards([tmp_path / "shards"], tmp_path / "bank", part_rows=4)
    ref = Bank(reference).entries()
    got = Bank(bank)
    assert len(got.parts) == math.ceil(len(ref) / 4)
    e = got.entries()
    assert torch.equal(e.prototypes, ref.prototypes) and torch.equal(e.keys, ref.keys)
    assert e.nouns == ref.nouns and e.caption_ids == ref.caption_ids
    # Memory-mapped gathers across parts return the same rows.
    ids = np.array([len(ref) - 1, 0, 5, 3])
    assert np.array_equal(got.prototypes(ids), ref.prototypes.numpy()[ids])
    assert got.nouns(ids) == [ref.nouns[i] for i in ids]


def test_merge_refuses_mixed_settings_gaps_and_unfinished_shards(tmp_path, captions):
    dims = (3, 2)

    def shard(root, i, n, settings, finish=True):
        a, b = shard_range(len(captions), i, n)
        w = ShardWriter(shard_dir(root, i, n), settings, (i, n), (a, b), chunk_rows=1)
        w.add(_entries(b - a, *dims), b - a)
        if finish:
            w.finish()

    s1 = {"captions": {"count": len(captions)}, "x": 1}
    shard(tmp_path / "a", 0, 2, s1)
    shard(tmp_path / "a", 1, 2, {**s1, "x": 2})
    with pytest.raises(BankError, match="different settings"):
        merge_shards([tmp_path / "a"], tmp_path / "out")
    shard(tmp_path / "b", 0, 2, s1)
    with pytest.raises(BankError, match="missing"):
        merge_shards([tmp_path / "b"], tmp_path / "out")
    shard(tmp_path / "c", 0, 2, s1)
    shard(tmp_path / "c", 1, 2, s1, finish=False)
    with pytest.raises(BankError, match="not complete"):
        merge_shards([tmp_path / "c"], tmp_path / "out")
    with pytest.raises(BankError, match="other settings"):
        ShardWriter(shard_dir(tmp_path / "c", 1, 2), {"x": 3}, (1, 2), shard_range(len(captions), 1, 2))


def _entries(n: int, dv: int, dt: int, seed: int = 0) -> Entries:
    gen = torch.Generator().manual_seed(seed)
    return Entries(torch.randn(n, dv, generator=gen), F.normalize(torch.randn(n, dt, generator=gen), dim=-1),
                   torch.arange(n), torch.rand(n, generator=gen), [f"n{i}" for i in range(n)],
                   [f"c{i}" for i in range(n)])


# -- index and retrieval --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_bank(tmp_path_factory) -> Bank:
    out = tmp_path_factory.mktemp("synthetic")
    return Bank(write_bank(iter([_entries(150, 6, 12, 1), _entries(150, 6, 12, 2)]), out, {"models": {}},
                           part_rows=64))


def test_exact_search_equals_brute_force_numpy(synthetic_bank):
    bank = synthetic_bank
    build_index(bank, "flat")
    keys = bank.keys()
    q = F.normalize(torch.randn(5, 12, generator=torch.Generator().manual_seed(3)), dim=-1).numpy()
    k = 40
    brute = q @ keys.T
    expected_ids = np.argsort(-brute, axis=1)[:, :k]
    for index in (open_index(bank), KeyIndex("flat", None, bank)):  # faiss, and the numpy fallback
        scores, ids = index.search(q, k)
        for r in range(len(q)):
            assert set(ids[r]) == set(expected_ids[r])
            assert np.allclose(scores[r], brute[r, ids[r]], atol=1e-5)
            assert np.all(np.diff(scores[r]) <= 1e-6)
    # k beyond the bank: the list ends with −1 ids.
    _, ids = open_index(bank).search(q[:1], len(bank) + 3)
    assert (ids[0, :len(bank)] >= 0).all() and (ids[0, len(bank):] == -1).all()
    _, ids = brute_force_search(bank.key_blocks(), q[:1], len(bank) + 3)
    assert (ids[0, len(bank):] == -1).all()


def test_hnsw_index_is_saved_beside_the_bank_and_checked(synthetic_bank, tmp_path):
    bank = synthetic_bank
    build_index(bank, "hnsw")
    meta = json.loads((bank.root / "index.json").read_text())
    assert meta["kind"] == "hnsw" and meta["rows"] == len(bank) and meta["bank"] == bank.fingerprint
    index = open_index(bank, ef_search=1000)
    assert index.kind == "hnsw"
    q = bank.keys()[:3]
    _, ids = index.search(q, 10)
    assert list(ids[:, 0]) == [0, 1, 2]  # each key is its own nearest neighbour
    with pytest.raises(BankError, match="'flat' was asked for"):
        open_index(bank, kind="flat")
    build_index(bank, "flat")
    # An index of other rows is refused.
    other = Bank(write_bank(iter([_entries(20, 6, 12, 9)]), tmp_path / "other", {}))
    (other.root / "index.faiss").write_bytes((bank.root / "index.faiss").read_bytes())
    (other.root / "index.json").write_text((bank.root / "index.json").read_text())
    with pytest.raises(BankError, match="other bank rows"):
        open_index(other)



def test_a_failed_index_write_keeps_the_saved_index_and_leaves_no_temporary_file(synthetic_bank, monkeypatch):
    bank = synthetic_bank
    build_index(bank, "flat")
    saved = (bank.root / "index.faiss").read_bytes()

    def crash(index, path):
        Path(path).write_bytes(b"half an index")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_index(bank, "hnsw")
    monkeypatch.undo()
    assert (bank.root / "index.faiss").read_bytes() == saved
    assert open_index(bank).kind == "flat"
    assert not [p.name for p in bank.root.iterdir() if p.name.endswith(".tmp")]


# -- the authors' release ---------------------------------------------------------------------------------


def test_converter_keeps_sorted_file_order_and_non_finite_rows(tmp_path):
    gen = np.random.default_rng(4)
    names = ["391895_0_man", "100_3_dog", "100_1_cat", "5_2_sky", "77_0_tree"]  # created in this order
    rel = tmp_path / "release"
    (rel / "prototypes").mkdir(parents=True)
    protos = {}
    for n in names:
        protos[n] = gen.standard_normal(8).astype(np.float32)
        np.save(rel / "prototypes" / f"{n}.npy", protos[n])
    protos["5_2_sky"][3] = np.nan
    np.save(rel / "prototypes" / "5_2_sky.npy", protos["5_2_sky"])
    order = sorted(names)  # row i <-> i-th sorted file name (trap 8)
    keys = F.normalize(torch.from_numpy(gen.standard_normal((5, 4)).astype(np.float32)), dim=-1).numpy()
    index = faiss.IndexFlatIP(4)
    index.add(keys)
    faiss.write_index(index, str(rel / "knn.index"))

    from ovss.banks.convert import convert_release

    bank = convert_release(rel, rel / "prototypes", tmp_path / "bank", part_rows=2)
    assert len(bank) == 5 and len(bank.parts) == 3
    got = bank.prototypes(np.arange(5))
    for i, n in enumerate(order):
        assert np.array_equal(got[i], protos[n], equal_nan=True)
    assert np.isnan(got[order.index("5_2_sky")]).any()  # kept, not filtered out (trap 9)
    assert np.array_equal(bank.keys(), keys)
    assert bank.nouns(np.arange(5)) == [n.rsplit("_", 1)[1] for n in order]
    assert bank.models == {"clip": "openai/clip-vit-large-patch14", "dinov2": "facebook/dinov2-large"}
    s1, i1 = index.search(keys, 3)
    s2, i2 = open_index(bank).search(keys, 3)
    assert np.array_equal(i1, i2)
    with pytest.raises(BankError, match="prototype files"):
        (rel / "prototypes" / "zzz_extra.npy").write_bytes((rel / "prototypes" / "77_0_tree.npy").read_bytes())
        convert_release(rel / "knn.index", rel / "prototypes", tmp_path / "bank2")


# -- CLI --------------------------------------------------------------------------------------------------


def test_cli_build_shards_merge_and_index(tmp_path, reference, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    common = ["--captions", str(caps), "-o", str(tmp_path / "bank"), "--models", "tiny", "--device", "cpu",
              "--set", "steps=2", "--set", "resolution=64", "--set", "chunk_rows=1", "--batch-size", "2"]
    for i in range(2):
        assert main(["bank", "build", *common, "--shard", f"{i}/2"]) == 0
    assert not (tmp_path / "bank" / "manifest.json").exists()
    assert main(["bank", "merge", str(tmp_path / "bank" / "shards"), "-o", str(tmp_path / "bank")]) == 0
    assert (tmp_path / "bank" / "part-00000.safetensors").read_bytes() == \
        (reference / "part-00000.safetensors").read_bytes()
    assert json.loads((tmp_path / "bank" / "index.json").read_text())["kind"] == "flat"
    assert main(["bank", "index", str(tmp_path / "bank"), "--kind", "hnsw"]) == 0
    assert open_index(Bank(tmp_path / "bank")).kind == "hnsw"
    assert main(["bank", "build", *common, "--shard", "2/2"]) == 2
    assert main(["bank", "build", *common, "--set", "nope=1"]) == 2
    assert "no option 'nope'" in capsys.readouterr().err
