"""The `ovss` CLI driven through `main(argv)` with a small colour-threshold method (no model, no FA-Seg)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ovss.cli as cli
import ovss.registry as registry
from ovss.methods.base import Method, SegmentRequest
from ovss.models import PRESETS
from ovss.result import Segmentation

FAKE = "fake-test"
#: the fake's one model role: listed by `ovss methods`, never loaded (roles=() means nothing is required)
FAKE_PRESET = {"colour": ("clip", "fake-org/colour-model")}
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


class ColourThreshold(Method):
    """Class k scores the image's channel k % 3 (red, green, blue): a segmenter whose answer a test can predict."""

    @dataclass
    class Config:
        seed: int = 0
        gain: float = 1.0
        tags: list[str] = field(default_factory=list)
        prompt: str = "x"

    roles = ()
    instances: list["ColourThreshold"] = []
    batches: list[int] = []

    def __init__(self, config, models=None, *, device=None, dtype=None):
        super().__init__(config, models, device=device, dtype=dtype)
        self.models_arg = models
        ColourThreshold.instances.append(self)

    def _segment_batch(self, images: list[Image.Image], request: SegmentRequest) -> list[Segmentation]:
        ColourThreshold.batches.append(len(images))
        out = []
        for im in images:
            a = np.asarray(im, dtype=np.float32) / 255.0
            fg = np.stack([a[..., k % 3] for k in range(len(request.classes))]) * self.config.gain
            if request.background:
                thr = 0.5 if request.bg_threshold is None else request.bg_threshold
                labels = np.where(fg.max(0) >= thr, fg.argmax(0) + 1, 0)
                scores = np.concatenate([np.full((1, *fg.shape[1:]), thr, np.float32), fg])
                classes = ["background", *request.classes]
            else:
                labels, scores, classes = fg.argmax(0), fg, list(request.classes)
            out.append(Segmentation(labels, scores.astype(np.float32), classes, {"method": FAKE}))
        return out


@pytest.fixture(autouse=True)
def fake_method(monkeypatch):
    monkeypatch.setitem(PRESETS, FAKE, FAKE_PRESET)
    registry.register(FAKE)(ColourThreshold)
    ColourThreshold.instances.clear()
    ColourThreshold.batches.clear()
    yield ColourThreshold
    registry._REGISTRY.pop(FAKE, None)


def two_colour(w: int, h: int, left, right) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2:] = right
    return a


def expected_labels(a: np.ndarray, n_classes: int = 2, thr: float = 0.5) -> np.ndarray:
    """The fake's rule restated: background unless a class channel reaches thr; class k <-> channel k."""
    fg = np.stack([a[..., k % 3] / 255.0 for k in range(n_classes)])
    return np.where(fg.max(0) >= thr, fg.argmax(0) + 1, 0)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two good images (one in a subfolder), a corrupt PNG, a text file named .jpg, an ignored notes.txt."""
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(two_colour(12, 8, RED, GREEN)).save(d / "a.png")
    Image.fromarray(two_colour(10, 6, BLUE, RED)).save(d / "sub" / "c.png")
    Image.fromarray(two_colour(10, 6, GREEN, GREEN)).save(d / "broken.png")
    data = (d / "broken.png").read_bytes()
    (d / "broken.png").write_bytes(data[: len(data) // 2])
    (d / "fake.jpg").write_text("this is not a picture\n")
    (d / "notes.txt").write_text("ignored: not an image extension\n")
    return d


def run(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def test_folder_with_bad_files_segments_the_good_ones(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run("segment", folder, "-m", FAKE, "-c", "red, green", "--batch-size", 2, "-o", out)
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{folder / 'broken.png'}: truncated/corrupt" in err
    assert f"{folder / 'fake.jpg'}: not an image" in err
    assert "notes.txt" not in err
    for stem, a in [("a", two_colour(12, 8, RED, GREEN)), ("c", two_colour(10, 6, BLUE, RED))]:
        labels = np.array(Image.open(out / f"{stem}.png"))
        assert np.array_equal(labels, expected_labels(a))
        assert (out / f"{stem}_overlay.png").is_file()
        assert json.loads((out / f"{stem}.json").read_text())["classes"] == ["background", "red", "green"]
    assert not (out / "broken.png").exists() and not list(out.glob("fake*"))
    assert json.loads((out / "classes.json").read_text())["classes"] == ["background", "red", "green"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == FAKE and summary["completed"] is True
    assert summary["models"] == {"colour": "fake-org/colour-model"}
    assert [i["stem"] for i in summary["images"]] == ["a", "c"]
    assert summary["images"][0]["files"]["labels"] == "a.png"
    assert sorted(f["input"] for f in summary["failures"]) == [str(folder / "broken.png"), str(folder / "fake.jpg")]
    assert ColourThreshold.batches == [2]  # both good images went through in one batch


def test_all_good_exits_0_and_options_reach_the_method(folder, tmp_path):
    out = tmp_path / "out"
    rc = run("segment", folder / "a.png", "-m", FAKE, "-c", "red,green", "--no-background", "--seed", 7,
             "--set", "gain=2", "--set", "tags=a,b", "--set", "prompt=1", "--models", "tiny", "--masks", "-o", out)
    assert rc == 0
    (inst,) = ColourThreshold.instances
    assert inst.config == ColourThreshold.Config(seed=7, gain=2.0, tags=["a", "b"], prompt="1")
    assert isinstance(inst.config.gain, float) and inst.models_arg == "tiny"
    assert json.loads((out / "classes.json").read_text())["classes"] == ["red", "green"]
    labels = np.array(Image.open(out / "a.png"))
    assert np.array_equal(labels, two_colour(12, 8, RED, GREEN)[..., 1] // 255)  # argmax: red 0, green 1
    assert sorted(p.name for p in (out / "a_masks").iterdir()) == ["green.png", "red.png"]
    assert json.loads((out / "summary.json").read_text())["models"] == {"colour": "tiny"}


def test_same_stems_get_distinct_names(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (4, 4), RED).save(tmp_path / sub / "img.png")
    Image.new("RGB", (4, 4), GREEN).save(tmp_path / "summary.png")
    out = tmp_path / "out"
    rc = run("segment", tmp_path / "x" / "img.png", tmp_path / "y" / "img.png", tmp_path / "summary.png",
             "-m", FAKE, "-c", "red,green", "-o", out)
    assert rc == 0
    stems = [i["stem"] for i in json.loads((out / "summary.json").read_text())["images"]]
    assert stems == ["img", "img_2", "summary_2"]
    assert np.all(np.array(Image.open(out / "summary_2.png")) == 2)


def test_unwritable_out_is_refused_before_any_work(folder, tmp_path, capsys, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("an image was loaded before the output folder was checked")

    monkeypatch.setattr(cli, "load_image", no_loading)
    monkeypatch.setattr(cli, "expand_inputs", no_loading)
    blocker = tmp_path / "plain-file"
    blocker.write_text("a file, so nothing can be created under it")
    for out in (blocker / "out", blocker):
        rc = run("segment", folder, "-m", FAKE, "-c", "red,green", "-o", out)
        assert rc == 2
        assert str(out) in capsys.readouterr().err
    assert ColourThreshold.instances == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_is_refused(folder, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert run("segment", folder, "-m", FAKE, "-c", "red", "-o", ro / "out") == 2
        assert "cannot be created or written" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("classes, message", [
    (["-c", ""], "empty class list"),
    (["-c", "cat,dog,Cat"], "duplicate"),
    (["-c", "cat,,dog"], "blank"),
    (["-c", "background,cat"], "reserved"),
])
def test_bad_class_lists_exit_2(folder, tmp_path, capsys, classes, message):
    out = tmp_path / "out"
    assert run("segment", folder, "-m", FAKE, *classes, "-o", out) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and ColourThreshold.instances == []


def test_classes_file(folder, tmp_path, capsys):
    f = tmp_path / "classes.txt"
    f.write_text("# colours\nred, green\n\nblue\n")
    out = tmp_path / "out"
    assert run("segment", folder / "a.png", "-m", FAKE, "--classes-file", f, "-o", out) == 0
    assert json.loads((out / "classes.json").read_text())["classes"] == ["background", "red", "green", "blue"]
    f.write_text("red\nRed\n")
    assert run("segment", folder / "a.png", "-m", FAKE, "--classes-file", f, "-o", out) == 2
    assert "duplicate" in capsys.readouterr().err
    assert run("segment", folder / "a.png", "-m", FAKE, "--classes-file", tmp_path / "nope.txt", "-o", out) == 2


def test_bad_options_exit_2_before_work(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("segment", folder, "-m", FAKE, "-c", "red", "--set", "steps=3", "-o", out) == 2
    assert "valid options: gain, prompt, seed, tags" in capsys.readouterr().err
    assert run("segment", folder, "-m", "no-such-method", "-c", "red", "-o", out) == 2
    assert "unknown method" in capsys.readouterr().err
    assert run("segment", folder, "-m", FAKE, "-c", "red", "--models", "huge", "-o", out) == 2
    assert not out.exists()
    assert run("segment", folder, "-m", FAKE, "-c", "red", "--models", "diffusion=./sd", "-o", out) == 2
    assert "diffusion" in capsys.readouterr().err  # the model set names the unknown role
    assert ColourThreshold.instances == []


def test_nothing_matches(tmp_path, capsys):
    rc = run("segment", tmp_path / "missing.png", str(tmp_path / "*.jpg"), "-m", FAKE, "-c", "red",
             "-o", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 1 and "missing.png: file not found" in err and "no images match" in err
    assert ColourThreshold.instances == []


def test_parse_models_and_values():
    assert cli.parse_models(None) is None and cli.parse_models("paper") is None
    assert cli.parse_models("tiny") == "tiny" and cli.parse_models("toy") == "toy"
    assert cli.parse_models("diffusion=./sd, captioner=tiny") == {"diffusion": "./sd", "captioner": "tiny"}
    with pytest.raises(cli.CLIError):
        cli.parse_models("diffusion=")
    assert [cli.parse_value(v) for v in ["3", "0.5", "true", "Off", "none", "cat"]] == [3, 0.5, True, False, None,
                                                                                        "cat"]
    assert cli.parse_value("1,2.5,x") == [1, 2.5, "x"]


@pytest.mark.parametrize("argv", [["--help"], ["segment", "--help"], ["methods", "--help"]])
def test_help_teaches(argv, capsys):
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "Examples" in text and "ovss" in text


def test_no_command_and_bad_usage(capsys):
    assert cli.main([]) == 2
    assert cli.main(["segment", "x.png", "-c", "cat", "-o", "out"]) == 2  # -m is required
    assert "-m/--method" in capsys.readouterr().err


def test_methods_lists_roles_and_hub_ids(capsys):
    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fake = [ln for ln in lines if ln.split()[0] == FAKE]
    assert fake and "colour=fake-org/colour-model (clip)" in fake[0]
    assert sorted(ln.split()[0] for ln in lines) == registry.list_methods()
