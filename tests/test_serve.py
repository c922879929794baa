"""`ovss serve` handlers (no browser): uploads under limits, class lists, choices, warm models, files, CLI."""
import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

import ovss
from ovss import viz
from ovss.cli import main
from ovss.data.names import COCO_THINGS
from ovss.io import ImageLoadError
from ovss.models import ModelNotFoundError
from ovss.result import Segmentation
from ovss.serve import RunRequest, ServeApp, ServeConfig, ServeError
from ovss.serve import app as serve_app
from ovss.serve.app import TINY_FALLBACK_NOTE, decode_upload, heatmap, parse_classes, resolve_models, vocabulary_text
from ovss.toy import make_scene


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels while its data holds a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def scene_image():
    return make_scene(2_000_000, 96).image


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    app = ServeApp(ServeConfig(models="tiny", methods=["faseg"], device="cpu",
                               work_dir=tmp_path_factory.mktemp("serve")))
    yield app
    app.close()


class FakeSegmenter:
    """Stripes over [background, *classes]; records each call's keyword arguments."""

    def __init__(self, name):
        self.name = name
        self.calls = []

    def segment(self, image, classes, **kwargs):
        self.calls.append(kwargs)
        names = ["background", *classes] if kwargs.get("background", True) else list(classes)
        w, h = image.size
        labels = np.tile((np.arange(w) * len(names)) // w, (h, 1)).astype(np.int64)
        scores = np.linspace(0, 1, len(names) * 64, dtype=np.float32).reshape(len(names), 8, 8)
        return Segmentation(labels, scores, names, {"method": self.name, "bg_threshold": kwargs.get("bg_threshold")})


@pytest.fixture
def fake_create(monkeypatch):
    """ovss.create replaced by a counter that builds FakeSegmenters (or raises for names in `fail`)."""
    made = []
    fail = {}

    def create(name, models=None, **kwargs):
        if name in fail:
            raise fail[name]
        seg = FakeSegmenter(name)
        made.append((name, models, seg))
        return seg

    monkeypatch.setattr(ovss, "create", create)
    return made, fail


# -- a valid image, end to end on tiny models -------------------------------------------------------------


def test_valid_upload_matches_the_public_api_and_writes_downloads(tiny_app, scene_image):
    progress = []
    result = tiny_app.run(RunRequest(classes="ball, box, kite", methods=["faseg"], upload=png_bytes(scene_image),
                                     models="tiny"), progress=lambda f, msg: progress.append((f, msg)))
    (view,) = result.views
    assert view.error is None and result.classes == ["ball", "box", "kite"] and result.models == "tiny"
    direct = ovss.create("faseg", models="tiny", device="cpu").segment(scene_image, ["ball", "box", "kite"])
    np.testing.assert_array_equal(view.segmentation.labels, direct.labels)  # no logic of its own
    assert np.array_equal(np.asarray(view.overlay), np.asarray(viz.overlay(scene_image, direct.labels, direct.classes)))
    present = np.unique(direct.labels)
    assert len(view.masks) == len(present)
    for (mask, caption), idx in zip(view.masks, present):
        assert caption.startswith(direct.classes[idx])
        np.testing.assert_array_equal(np.asarray(mask) > 0, direct.labels == idx)
    assert [c.split(" ")[0] for _, c in view.heatmaps] == direct.meta["candidates"]
    labels_png, summary_json, overlay_png, masks_zip = view.files
    np.testing.assert_array_equal(np.asarray(Image.open(labels_png)), direct.labels)
    assert json.loads(summary_json.read_text())["classes"] == direct.classes
    assert Image.open(overlay_png).size[1] == scene_image.height
    with zipfile.ZipFile(masks_zip) as zf:
        assert sorted(zf.namelist()) == sorted(f"faseg_masks/{direct.classes[i]}.png" for i in present)
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert result.comparison.width > 2 * scene_image.width  # input | faseg overlay (+ legend)


def test_second_request_reuses_the_warm_segmenter(tiny_app, scene_image, monkeypatch):
    tiny_app.segmenter("faseg", "tiny")

    def refuse(*args, **kwargs):
        raise AssertionError("models were loaded again")

    monkeypatch.setattr(ovss, "create", refuse)
    result = tiny_app.run(RunRequest(classes="ball", methods=["faseg"], toy_scene="toy scene 1", models="tiny"))
    assert result.views[0].error is None and result.image.size == (256, 256)


# -- bad uploads ----------------------------------------------------------------------------------------


def test_corrupt_uploads_are_refused_with_a_reason(scene_image):
    whole = png_bytes(scene_image)
    with pytest.raises(ImageLoadError, match="truncated/corrupt"):
        decode_upload(whole[: len(whole) // 2])
    with pytest.raises(ImageLoadError, match="not an image"):
        decode_upload(b"GIF? no, a text file pretending to be an image\n" * 4)
    with pytest.raises(ImageLoadError, match="empty"):
        decode_upload(b"")
    ico = io.BytesIO()
    scene_image.resize((32, 32)).save(ico, format="ICO")  # a real image in a format uploads may not use
    with pytest.raises(ImageLoadError, match="not one of PNG"):
        decode_upload(ico.getvalue())


def test_corrupt_upload_through_the_handler_raises_the_same_error(tiny_app):
    with pytest.raises(ImageLoadError, match="upload: not an image"):
        tiny_app.run(RunRequest(classes="ball", methods=["faseg"], upload=b"\x00" * 100, models="tiny"))


def test_oversized_uploads_and_decompression_bombs_are_refused_before_decoding(scene_image):
    data = png_bytes(scene_image)
    with pytest.raises(ImageLoadError, match="limit is"):
        decode_upload(data, max_bytes=len(data) - 1)
    # The header claims 10^10 pixels and there is no pixel data: the refusal must come from the header.
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        decode_upload(png_header_only(100_000, 100_000))
    with pytest.raises(ImageLoadError, match=r"96x96 = 9216 pixels is more than the limit of 9000"):
        decode_upload(data, max_pixels=9000)
    assert decode_upload(data, max_pixels=9216).size == (96, 96)


def test_uploads_of_any_mode_come_out_rgb(scene_image):
    grey = decode_upload(png_bytes(scene_image.convert("L")))
    assert grey.mode == "RGB" and np.array_equal(np.asarray(grey)[..., 0], np.asarray(scene_image.convert("L")))
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert decode_upload(png_bytes(rgba)).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, as shown


def test_limits_of_the_app_config_apply_to_uploads(tmp_path, scene_image):
    app = ServeApp(ServeConfig(methods=["faseg"], max_pixels=100, work_dir=tmp_path))
    with pytest.raises(ImageLoadError, match="limit of 100"):
        app.image(png_bytes(scene_image), None)


# -- class lists and choices ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("", "empty class list"), (" , ", "blank class name"), ("cat, background", "reserved"),
    ("cat, Cat", "duplicate"), ("cat\x07", "control characters"), ("x" * 101, "longer than 100"),
    (", ".join(f"c{i}" for i in range(257)), "at most 256"),
])
def test_bad_class_lists_are_refused(text, message):
    with pytest.raises(ServeError, match=message):
        parse_classes(text)


def test_empty_classes_are_refused_before_any_model_loads(tmp_path, fake_create, scene_image):
    made, _ = fake_create
    app = ServeApp(ServeConfig(methods=["faseg"], work_dir=tmp_path))
    with pytest.raises(ServeError, match="empty class list"):
        app.run(RunRequest(classes="  ", methods=["faseg"], upload=png_bytes(scene_image), models="tiny"))
    assert made == []


def test_class_lists_are_parsed_in_order():
    assert parse_classes("cat,  sofa\nfloor") == ["cat", "sofa", "floor"]


@pytest.mark.parametrize("change, message", [
    ({"methods": ["nosuch"]}, "not offered"), ({"methods": []}, "no method"),
    ({"models": "/etc/passwd"}, "unknown models preset"), ({"toy_scene": "../scene.png"}, "unknown toy scene"),
    ({"toy_scene": None}, "no image"), ({"bg_threshold": 1.5}, "outside"),
])
def test_request_choices_outside_the_offered_lists_are_refused(tmp_path, fake_create, change, message):
    app = ServeApp(ServeConfig(methods=["faseg"], work_dir=tmp_path))
    fields = {"classes": "ball", "methods": ["faseg"], "toy_scene": "toy scene 1", "models": "tiny", **change}
    with pytest.raises(ServeError, match=message):
        app.run(RunRequest(**fields))


def test_vocabularies_are_the_datasets_lists_without_background():
    assert vocabulary_text("voc20").startswith("aeroplane, bicycle, bird")
    assert vocabulary_text("coco_object").split(", ") == list(COCO_THINGS)
    assert "voc21" not in serve_app.VOCABULARIES  # identical to voc20 once background is left out
    assert all("background" not in v for v in serve_app.VOCABULARIES.values())
    assert "bed," in vocabulary_text("ade20k")  # mmseg's "bed " trailing space is not passed on
    with pytest.raises(ServeError, match="unknown vocabulary"):
        vocabulary_text("/etc")


# -- models: warm cache, toy fallback, failures ------------------------------------------------------------


def test_segmenters_are_cached_by_method_models_and_options(tmp_path, fake_create):
    made, _ = fake_create
    app = ServeApp(ServeConfig(methods=["faseg", "diffsegmenter"], work_dir=tmp_path, max_warm=2))
    request = RunRequest(classes="ball, box", methods=["faseg"], toy_scene="toy scene 2", models="tiny")
    app.run(request)
    app.run(request)
    assert [(n, m) for n, m, _ in made] == [("faseg", "tiny")]
    assert len(made[0][2].calls) == 2
    app.run(RunRequest(classes="ball", methods=["faseg"], toy_scene="toy scene 2", models="paper"))
    assert made[-1][:2] == ("faseg", None)  # "paper" -> create(models=None), the paper's hub ids
    app.run(RunRequest(classes="ball", methods=["diffsegmenter"], toy_scene="toy scene 2", models="tiny"))
    assert not app.is_warm("faseg", "tiny")  # max_warm=2: the least recently used one was dropped
    assert app.is_warm("faseg", "paper") and app.is_warm("diffsegmenter", "tiny")


def test_threshold_and_background_are_passed_through(tmp_path, fake_create):
    made, _ = fake_create
    app = ServeApp(ServeConfig(methods=["faseg"], work_dir=tmp_path))
    app.run(RunRequest(classes="ball", methods=["faseg"], toy_scene="toy scene 1", models="tiny", bg_threshold=0.3))
    app.run(RunRequest(classes="ball", methods=["faseg"], toy_scene="toy scene 1", models="tiny", background=False))
    calls = made[0][2].calls
    assert calls == [{"background": True, "bg_threshold": 0.3}, {"background": False, "bg_threshold": None}]


def test_toy_models_fall_back_to_tiny_with_a_visible_note(tmp_path, fake_create, monkeypatch):
    made, _ = fake_create
    monkeypatch.setattr(serve_app, "_toy_models_installed", lambda: False)
    assert resolve_models("toy") == ("tiny", TINY_FALLBACK_NOTE)
    app = ServeApp(ServeConfig(methods=["faseg"], work_dir=tmp_path))
    result = app.run(RunRequest(classes="ball", methods=["faseg"], toy_scene="toy scene 1", models="toy"))
    assert result.models == "tiny" and "tiny random-weight models" in result.note and made[0][1] == "tiny"
    monkeypatch.setattr(serve_app, "_toy_models_installed", lambda: True)
    assert resolve_models("toy") == ("toy", "")
    assert resolve_models("tiny") == ("tiny", "")


def test_a_failing_method_is_reported_and_the_others_still_run(tmp_path, fake_create):
    _, fail = fake_create
    fail["diffsegmenter"] = ModelNotFoundError("cannot load the diffusion model for role 'diffusion'\nmore")
    app = ServeApp(ServeConfig(methods=["faseg", "diffsegmenter"], work_dir=tmp_path))
    result = app.run(RunRequest(classes="ball", methods=["diffsegmenter", "faseg"], toy_scene="toy scene 1",
                                models="paper"))
    failed, ok = result.views
    assert failed.error == "cannot load the diffusion model for role 'diffusion'" and failed.overlay is None
    assert "failed" in failed.summary
    assert ok.error is None and ok.overlay is not None
    assert result.comparison is not None


def test_class_names_are_sanitized_before_they_touch_file_names(tmp_path, fake_create):
    app = ServeApp(ServeConfig(methods=["faseg"], work_dir=tmp_path))
    result = app.run(RunRequest(classes="../../evil, a/b, a b, C:\\x", methods=["faseg"], toy_scene="toy scene 1",
                                models="tiny"))
    view = result.views[0]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.resolve().is_relative_to(tmp_path.resolve()) for p in written)
    with zipfile.ZipFile(view.files[-1]) as zf:
        names = sorted(n.split("/", 1)[1] for n in zf.namelist())
    assert names == sorted(["background.png", "evil.png", "a_b.png", "a_b_2.png", "C_x.png"])
    assert json.loads(view.files[1].read_text())["classes"][1] == "../../evil"  # the names themselves are kept


def test_only_the_latest_requests_keep_their_files(tmp_path, fake_create, monkeypatch):
    monkeypatch.setattr(serve_app, "KEPT_REQUESTS", 2)
    app = ServeApp(ServeConfig(methods=["faseg"], work_dir=tmp_path))
    dirs = [app.run(RunRequest(classes="ball", methods=["faseg"], toy_scene="toy scene 1", models="tiny"))
            .views[0].files[0].parent for _ in range(3)]
    assert [d.exists() for d in dirs] == [False, True, True]


def test_close_removes_a_work_dir_the_app_created(fake_create):
    app = ServeApp(ServeConfig(methods=["faseg"]))
    app.run(RunRequest(classes="ball", methods=["faseg"], toy_scene="toy scene 1", models="tiny"))
    work = app.work_dir
    assert any(work.iterdir())
    app.close()
    assert not work.exists()


# -- pictures ----------------------------------------------------------------------------------------------


def test_heatmap_follows_the_viridis_stops_and_clips():
    rgb = np.asarray(heatmap(np.array([[0.0, 0.5, 1.0, -3.0, 7.0, 0.125]])))[0]
    assert rgb[0].tolist() == [68, 1, 84] and rgb[2].tolist() == [253, 231, 37]
    assert rgb[1].tolist() == [33, 145, 140]  # the middle stop
    assert rgb[3].tolist() == rgb[0].tolist() and rgb[4].tolist() == rgb[2].tolist()
    assert rgb[5].tolist() == [round((68 + 59) / 2), round((1 + 82) / 2), round((84 + 139) / 2)]
    np.testing.assert_array_equal(np.asarray(heatmap(np.array([[2.0]]), lo=1.0, hi=3.0)), [[[33, 145, 140]]])


def test_large_images_are_shown_downscaled_and_downloaded_full_size(tmp_path, fake_create):
    big = make_scene(2_000_001, (200, 1600)).image
    app = ServeApp(ServeConfig(methods=["faseg"], work_dir=tmp_path))
    view = app.run(RunRequest(classes="ball", methods=["faseg"], upload=png_bytes(big), models="tiny")).views[0]
    assert view.overlay.height == 96 and view.masks[0][0].size == (768, 96)
    assert Image.open(view.files[0]).size == (1600, 200)


# -- the command ------------------------------------------------------------------------------------------


def test_serve_command_checks_its_options_before_starting(capsys):
    assert main(["serve", "--methods", "nosuch"]) == 2
    assert "unknown method(s) nosuch" in capsys.readouterr().err
    assert main(["serve", "--max-megapixels", "0"]) == 2
    assert main(["serve", "--models", "huge"]) == 2


def test_serve_warns_when_listening_beyond_this_machine(monkeypatch, capsys):
    pytest.importorskip("gradio", reason="the web extra (gradio) is not installed")
    from ovss.serve import server

    started = []
    monkeypatch.setattr(server, "serve", lambda config, host, port: started.append((config, host, port)))
    assert main(["serve", "--models", "tiny", "--methods", "faseg", "--port", "8123"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--max-upload-mb", "2"]) == 0
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    (cfg, host, port), (cfg2, host2, _) = started
    assert (host, port, cfg.models, cfg.methods) == ("127.0.0.1", 8123, "tiny", ["faseg"])
    assert host2 == "0.0.0.0" and cfg2.max_upload_bytes == 2 * 2**20


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                            ("::", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    from ovss.serve.server import is_loopback  # importable without gradio

    assert is_loopback(host) is loopback
