"""Atomic storage, manifests, the OVDiff prototype cache, resuming a killed build, sharding and the CLI."""
from __future__ import annotations

import functools
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import ovss
from ovss.banks import (ClassPrototypes, Manifest, PrototypeCache, SupportSet, atomic_save_safetensors,
                        load_safetensors, parse_shard, settings_hash, shard_classes)
from ovss.cli import main
from ovss.methods import ovdiff as od
from ovss.models import tiny as tiny_models

SMALL = dict(n_support=4, support_batch=2, steps=2, support_size=64, k_parts=4)
EXTRACTORS = ("sd", "dino", "clip")


# -- generic storage ----------------------------------------------------------------------------------------
def test_settings_hash_is_canonical():
    a = settings_hash({"steps": 30, "layers": ("a", "b"), "guidance": 8.0})
    assert a == settings_hash({"guidance": 8.0, "layers": ["a", "b"], "steps": 30})
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != settings_hash({"steps": 31, "layers": ("a", "b"), "guidance": 8.0})
    assert a != settings_hash({"steps": 30, "layers": ("b", "a"), "guidance": 8.0})


def test_atomic_safetensors_roundtrip_and_failed_write(tmp_path):
    path = tmp_path / "sub" / "x.safetensors"
    t = {"a": torch.arange(12.0).reshape(3, 4)[:, ::2], "empty": torch.zeros(0, 5),
         "u8": torch.tensor([1, 2], dtype=torch.uint8)}
    atomic_save_safetensors(path, t, {"class": "cat", "n": 3})
    got, meta = load_safetensors(path)
    assert meta == {"class": "cat", "n": "3"}
    assert all(torch.equal(got[k], v) for k, v in t.items()) and got["empty"].shape == (0, 5)
    umask = os.umask(0o022)
    try:  # the umask decides who may read a bank or cache, not safetensors (its save_file leaves 0600)
        atomic_save_safetensors(path, t)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(umask)
    before = path.read_bytes()
    shared = torch.zeros(4)
    with pytest.raises(Exception):  # tensors sharing memory are refused by safetensors mid-write
        atomic_save_safetensors(path, {"a": shared, "b": shared})
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["x.safetensors"]
    path.write_bytes(before[:20])
    with pytest.raises(ValueError):
        load_safetensors(path)
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "nope.safetensors")


def test_manifest_marks_complete_entries_only(tmp_path):
    data = tmp_path / "d.bin"
    data.write_bytes(b"12345")
    settings = {"model": "tiny", "k": 32}
    m = Manifest(dict(settings), data={"seconds": 1.5})
    m.add_file(data, tmp_path)
    m.write(tmp_path / "m.json")
    ok = Manifest.load_if_complete(tmp_path / "m.json", settings)
    assert ok is not None and ok.files == {"d.bin": 5} and ok.data == {"seconds": 1.5}
    assert json.loads((tmp_path / "m.json").read_text())["settings_hash"] == settings_hash(settings)
    assert Manifest.load_if_complete(tmp_path / "m.json", {"model": "tiny", "k": 16}) is None
    data.write_bytes(b"123")  # torn / replaced file
    assert Manifest.load_if_complete(tmp_path / "m.json", settings) is None
    data.unlink()
    assert Manifest.load_if_complete(tmp_path / "m.json", settings) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert Manifest.load_if_complete(tmp_path / "bad.json", settings) is None
    assert Manifest.load_if_complete(tmp_path / "absent.json", settings) is None


def test_prototype_cache_roundtrips(tmp_path):
    cache = PrototypeCache(tmp_path)
    ss = {"prompt": "A good picture of a cat", "seed": 42}
    g = torch.Generator().manual_seed(0)
    protos = ClassPrototypes(*(torch.randn(n, 6, generator=g) for n in (1, 3, 4, 1, 0, 4)))
    es = {"model": "tiny", "k_parts": 4}
    assert not cache.has_prototypes("cat", ss, "dino", es) and cache.load_prototypes("cat", ss, "dino", es) is None
    cache.save_prototypes("cat", ss, "dino", es, protos)
    back = cache.load_prototypes("cat", ss, "dino", es)
    assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), protos.tensors().values()))
    assert cache.load_prototypes("cat", ss, "dino", {**es, "k_parts": 8}) is None
    assert cache.load_prototypes("cat", {**ss, "seed": 1}, "dino", es) is None
    # support sets: masks of an odd size survive bit packing, images the PNG round trip
    fg = torch.rand(3, 5, 7, generator=g) > 0.5
    bg = ~fg
    images = torch.rand(3, 3, 5, 7, generator=g)
    support = SupportSet(torch.rand(3, 2, 2, generator=g), fg, bg, images)
    cache.save_support("cat", ss, support, keep_images=True, data={"empty_fg": 0})
    got, data = cache.load_support("cat", ss)
    assert torch.equal(got.fg, fg) and torch.equal(got.bg, bg) and torch.equal(got.attribution, support.attribution)
    assert (got.images - images).abs().max() <= 0.5 / 255 + 1e-6 and data["empty_fg"] == 0
    cache.save_support("dog", ss, support)
    assert cache.load_support("dog", ss)[0].images is None
    # names that sanitise alike still get their own folders
    assert PrototypeCache.class_slug("a/b") != PrototypeCache.class_slug("a_b")


def test_shards_partition_the_vocabulary():
    names = [f"c{i}" for i in range(11)]
    parts = [shard_classes(names, (i, 4)) for i in range(4)]
    assert sorted(sum(parts, [])) == sorted(names) and all(len(p) in (2, 3) for p in parts)
    assert shard_classes(names, None) == names and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


# -- resuming a killed build --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def method(tmp_path_factory):
    return ovss.create("ovdiff", models="tiny", cache_dir=str(tmp_path_factory.mktemp("unused")), **SMALL)


def _use_cache(method, root: Path, keep_images: bool = False):
    method.cache = PrototypeCache(root)
    method.config.keep_images = keep_images
    method._class_protos.clear()
    method._banks.clear()
    return method


def _count_sampler(monkeypatch) -> list[str]:
    prompts: list[str] = []
    real = od.sample
    monkeypatch.setattr(od, "sample", lambda dm, p, **kw: prompts.append(p[0]) or real(dm, p, **kw))
    return prompts


def _kill_at(monkeypatch, method, cls: str, extractor: str) -> None:
    """The process dies while writing `cls`'s `extractor` prototypes (its earlier extractors are on disk)."""
    real = method.cache.save_prototypes

    def save(name, ss, ext, es, protos, data=None):
        if (name, ext) == (cls, extractor):
            raise KeyboardInterrupt("killed")
        return real(name, ss, ext, es, protos, data)

    monkeypatch.setattr(method.cache, "save_prototypes", save)


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _done(method, name: str) -> list[str]:
    ss = method.support_settings(name)
    return [e for e in EXTRACTORS if method.cache.has_prototypes(name, ss, e, method.extractor_settings(e))]


@pytest.mark.parametrize("keep_images", [False, True])
def test_killed_build_resumes_without_recomputing(method, tmp_path, monkeypatch, keep_images):
    m = _use_cache(method, tmp_path / "cache", keep_images)
    classes = ["cat", "dog", "bird"]
    with monkeypatch.context() as mp:
        _kill_at(mp, m, "dog", "dino")
        with pytest.raises(KeyboardInterrupt):
            m.build_prototypes(classes)
    assert _done(m, "cat") == list(EXTRACTORS) and _done(m, "dog") == ["sd"] and _done(m, "bird") == []
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]
    cat_files = {k: v for k, v in _files(tmp_path / "cache").items() if k.startswith(m.cache.class_slug("cat"))}
    dog_sd = {k: v for k, v in _files(tmp_path / "cache").items()
              if "/sd-" in k and k.startswith(m.cache.class_slug("dog"))}

    prompts = _count_sampler(monkeypatch)
    status = m.build_prototypes(classes)
    assert status == {"cat": "cached", "dog": "built", "bird": "built"}
    # a finished class is never recomputed; dog resamples only when its images were not kept
    assert prompts == (["A good picture of a bird"] if keep_images else
                       ["A good picture of a dog", "A good picture of a bird"])
    after = _files(tmp_path / "cache")
    assert all(after[k] == v for k, v in {**cat_files, **dog_sd}.items())  # same bytes, not even rewritten
    assert all(_done(m, c) == list(EXTRACTORS) for c in classes)
    assert m.build_prototypes(classes) == dict.fromkeys(classes, "cached") and len(prompts) == len(set(prompts))

    # nothing lost: the resumed classes equal a build that never crashed
    resumed = {e: m.prototypes_for(["dog"], e)[0] for e in EXTRACTORS}
    clean = _use_cache(method, tmp_path / "clean", keep_images)
    clean.build_prototypes(["dog"])
    for e in EXTRACTORS:
        fresh = clean.prototypes_for(["dog"], e)[0]
        for a, b in zip(resumed[e].tensors().values(), fresh.tensors().values()):
            assert torch.allclose(a, b, atol=1e-5)


def test_changed_settings_get_their_own_entries(method, tmp_path, monkeypatch):
    m = _use_cache(method, tmp_path)
    m.build_prototypes(["cat"])
    prompts = _count_sampler(monkeypatch)
    m.config.k_parts = 2  # a new prototype key; the images were not kept, so the support set is sampled again
    try:
        assert m.build_prototypes(["cat"]) == {"cat": "built"} and len(prompts) == 1
        assert m.prototypes_for(["cat"], "dino")[0].fg_parts.shape[0] == 2
    finally:
        m.config.k_parts = SMALL["k_parts"]
    m._class_protos.clear()
    assert m.build_prototypes(["cat"]) == {"cat": "cached"}
    assert m.prototypes_for(["cat"], "dino")[0].fg_parts.shape[0] == 4


# -- the command line ---------------------------------------------------------------------------------------
def test_cli_build_with_shards(tmp_path, monkeypatch, capsys):
    cached_build = functools.lru_cache(maxsize=None)(tiny_models.build_tiny)
    monkeypatch.setattr(tiny_models, "build_tiny", cached_build)  # one tiny build for the three runs
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    base = ["prototypes", "build", "-c", "cat,dog,bird", "--cache", str(tmp_path), "--models", "tiny", "-q", *sets]
    assert main([*base, "--shard", "0/2"]) == 0
    assert "2 class(es) built, 0 already cached (shard 0/2: 2 of 3 classes)" in capsys.readouterr().out
    assert main([*base, "--shard", "1/2"]) == 0
    assert "1 class(es) built" in capsys.readouterr().out
    assert main(base) == 0
    assert "0 class(es) built, 3 already cached" in capsys.readouterr().out
    assert main([*base, "--shard", "2/2"]) == 2
    assert main(["prototypes", "build", "--dataset", "voc21", "--cache", str(tmp_path), "--models", "tiny", "-q",
                 "--shard", "19/20", *sets]) == 0
    assert "1 class(es) built" in capsys.readouterr().out
    assert (tmp_path / PrototypeCache.class_slug("monitor")).is_dir()  # VOC's tvmonitor, in OVDiff's spelling


def test_model_fingerprints_follow_the_weights_in_a_folder(tmp_path):
    """OVDiff's cache keys use these: prototypes of a re-trained local model (or of new toy models) are rebuilt."""
    from ovss.models.presets import ModelSet, folder_digest

    d = tmp_path / "sd"
    (d / "unet").mkdir(parents=True)
    (d / "unet" / "weights.safetensors").write_bytes(b"one")
    ms = ModelSet("ovdiff", {"diffusion": str(d)})
    before = ms.fingerprint("diffusion")
    assert before.startswith(f"{d}@") and before == ms.fingerprint("diffusion")
    (d / "unet" / "weights.safetensors").write_bytes(b"two")
    folder_digest.cache_clear()
    assert ms.fingerprint("diffusion") != before
    assert ms.fingerprint("dino") == "facebook/dino-vitb8"  # hub ids as given
    assert ModelSet("ovdiff", "tiny").fingerprint("diffusion") == "tiny"
    from ovss.banks.build import BuildConfig, bank_settings

    freeda = ModelSet("freeda", {"diffusion": str(d), "clip": "tiny", "dinov2": "tiny"})
    assert bank_settings(BuildConfig(), freeda, [])["models"] == {"diffusion": ms.fingerprint("diffusion"),
                                                                  "dinov2": "tiny", "clip": "tiny"}
    eps, rf = ModelSet("ovdiff", "toy").fingerprint("diffusion"), ModelSet("faseg", "toy").fingerprint("diffusion")
    assert eps.startswith("toy@") and rf.startswith("toy@") and eps != rf  # the ε and RF toy folders
