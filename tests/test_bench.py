"""`ovss bench`, the naive FA-Seg baseline and the full-size random models, on tiny models (seconds)."""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovss
from ovss.bench import BENCH_CAPTION, BenchConfig, NaiveFASeg, bench_images, markdown_table, run_bench
from ovss.bench.naive_faseg import explicit_affinity
from ovss.bench.runner import PeakMemory, Row
from ovss.cli import main
from ovss.methods.faseg import FASegConfig
from ovss.models import ModelNotFoundError, ModelSet, load_component
from ovss.models.random_full import _materialise, build_random_full

RES = 128  # tiny VAE: 16×16 latents, attention maps at sides 16/8/4/2
NAMES = ["tv monitor", "aeroplane", "cat"]  # multi-token names: spans of 2 sub-tokens


def _faseg(dtype: str = "float32"):
    return ovss.create("faseg", models="tiny", dtype=dtype, candidates="given", caption="given", resolution=RES)


def _optimized(method, images):
    n = len(images)
    return list(method.segment_many(images, NAMES, batch_size=n, given=[NAMES] * n, captions=[BENCH_CAPTION] * n))


# ---------------------------------------------------------------------------------------------------
# The naive baseline: the same algorithm, the same outputs
# ---------------------------------------------------------------------------------------------------
def test_naive_faseg_equals_the_optimized_method_in_fp32():
    """Issue 9: identical outputs, max abs difference of scores < 1e-3 in fp32 (same tiny models, same seed)."""
    method = _faseg()
    images = bench_images(2, 96, seed=3)
    fast = _optimized(method, images)
    naive = NaiveFASeg(method.models["diffusion"], method.config)
    for img, seg in zip(images, fast):
        slow = naive.segment(img, NAMES, BENCH_CAPTION)
        u = torch.from_numpy(seg.scores_lowres[1:])
        assert slow.scores.shape == u.shape == (3, RES, RES)
        assert float((slow.scores - u).abs().max()) < 1e-3
        assert float(u.max() - u.min()) > 0.5  # the maps are not flat: the comparison has teeth
        assert slow.labels.shape == seg.labels.shape == (96, 96)
        assert (slow.labels == seg.labels).mean() > 0.999


def test_naive_faseg_follows_the_config():
    """A changed seed or threshold changes the naive result as it changes the method's; unsupported options fail."""
    method = _faseg()
    img = bench_images(1, 64)[0]
    dm = method.models["diffusion"]
    base = NaiveFASeg(dm, method.config).segment(img, NAMES, BENCH_CAPTION)
    reseeded = NaiveFASeg(dm, FASegConfig(seed=1, resolution=RES)).segment(img, NAMES, BENCH_CAPTION)
    assert not torch.equal(base.scores, reseeded.scores)
    all_bg = NaiveFASeg(dm, FASegConfig(bg_threshold=2.0, resolution=RES)).segment(
        img, NAMES, BENCH_CAPTION)
    assert (all_bg.labels == 0).all()
    with pytest.raises(ValueError, match="self_resize"):
        NaiveFASeg(dm, FASegConfig(self_resize="paper"))


def test_explicit_affinity_is_the_spec_construction():
    """Âʳ: bicubic-upsampled queries, keys repeated (faseg.md §3.1 step 10), rows summing to (L/r)²."""
    r, side = 4, 16
    g = torch.Generator().manual_seed(0)
    S = torch.softmax(torch.randn(r * r, r * r, generator=g), dim=1)
    A = explicit_affinity(S, side)
    assert A.shape == (side * side, side * side)
    up = F.interpolate(S.T.reshape(1, r * r, r, r), size=(side, side), mode="bicubic", align_corners=False)
    for p in (0, 37, 200):  # query p, key q: S̃[p, block(q)]
        for q in (0, 5, 77, 255):
            block = (q // side) // (side // r) * r + (q % side) // (side // r)
            assert A[p, q] == up[0, block].reshape(-1)[p]
    assert torch.allclose(A.sum(1), torch.full((side * side,), (side / r) ** 2), rtol=1e-4)
    assert torch.equal(explicit_affinity(S, r), S)


# ---------------------------------------------------------------------------------------------------
# Half precision against fp32
# ---------------------------------------------------------------------------------------------------
#: tiny.py sharpens the tiny UNet's q/k by 6 so that fp32 maps are not flat; at that gain the softmax is almost
#: an argmax and any rounding flips winners (fp16 moves the UNet output by ~20 %). Half of it (gain 3) behaves
#: like a trained UNet (fp16 moves it by ~0.2 %), so the dtype check runs there.
QK_RESCALE = 0.5


def _rescaled_faseg(dtype: str):
    method = _faseg(dtype)
    with torch.no_grad():
        for module in method.models["diffusion"].unet.modules():
            if hasattr(module, "to_q") and hasattr(module, "to_k"):
                module.to_q.weight.mul_(QK_RESCALE)  # a power of 2: exact in every dtype
                module.to_k.weight.mul_(QK_RESCALE)
    return method


@pytest.fixture(scope="module")
def fp32_reference():
    images = bench_images(2, RES, seed=0)
    return images, _optimized(_rescaled_faseg("float32"), images)


@pytest.mark.parametrize("dtype, max_abs, mean_abs, agree", [
    ("float16", 2e-2, 2e-3, 0.95),  # the paper's dtype: measured 3e-3 / 8e-4 / 99.5 %
    ("bfloat16", 0.1, 1e-2, 0.90),  # 3 fewer mantissa bits: measured 3e-2 / 7e-3 / 93-98 %
])
def test_half_precision_tracks_fp32(fp32_reference, dtype, max_abs, mean_abs, agree):
    images, reference = fp32_reference
    method = _rescaled_faseg(dtype)
    assert method.models["diffusion"].unet.dtype == getattr(torch, dtype)
    for ref, seg in zip(reference, _optimized(method, images)):
        diff = np.abs(ref.scores_lowres[1:] - seg.scores_lowres[1:])
        assert np.isfinite(seg.scores_lowres).all()
        assert diff.max() < max_abs and diff.mean() < mean_abs
        assert (ref.labels == seg.labels).mean() >= agree


# ---------------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------------
def test_row_statistics_are_median_iqr_and_throughput():
    times = [0.5, 0.1, 0.4, 0.2, 0.3]
    row = Row("optimized", 4, times, times, 10, 5, "rss_sampled")
    q1, q2, q3 = statistics.quantiles(sorted(times), n=4, method="inclusive")
    assert row.stats["median_s"] == q2 == 0.3
    assert (row.stats["q1_s"], row.stats["q3_s"]) == (q1, q3) == (0.2, 0.4)
    assert (row.stats["min_s"], row.stats["max_s"]) == (0.1, 0.5)
    assert row.stats["images_per_s"] == pytest.approx(4 / 0.3)
    assert row.stats["s_per_image"] == pytest.approx(0.3 / 4)


def test_peak_memory_sees_a_transient_cpu_allocation():
    with PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(48 * 2**20)  # 192 MiB, touched, held ~0.1 s, then freed
        time.sleep(0.1)
        del block
    assert mem.kind == "rss_sampled"
    assert mem.peak - mem.base > 150 * 2**20


def test_cli_bench_writes_the_report_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    code = main(["bench", "-m", "faseg", "--models", "tiny", "--resolution", str(RES), "--batch-sizes", "1,2",
                 "--repeats", "2", "--warmup", "0", "--classes", "2", "--device", "cpu", "-o", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("method", "models", "device", "device_name", "dtype", "threads", "resolution", "classes", "compile",
                "versions", "date", "rows", "comparisons", "process_peak_rss_bytes"):
        assert key in report
    assert report["dtype"] == "float32" and report["device"] == "cpu" and report["compile"] == "off"
    assert {"torch", "diffusers", "transformers"} <= set(report["versions"])
    assert [(r["impl"], r["batch"]) for r in report["rows"]] == [
        ("optimized", 1), ("naive", 1), ("optimized", 2), ("naive", 2)]
    for r in report["rows"]:
        assert len(r["times_s"]) == len(r["cpu_times_s"]) == 2
        assert all(t > 0 for t in r["times_s"] + r["cpu_times_s"])
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"])
        assert r["peak_memory_bytes"] > 0 and r["memory_kind"] == "rss_sampled"
    for c in report["comparisons"]:
        assert c["max_abs_diff"] < 1e-3 and c["label_agreement"] > 0.999
        fast, slow = (next(r for r in report["rows"] if r["impl"] == i and r["batch"] == c["batch"])
                      for i in ("optimized", "naive"))
        assert c["speedup"] == pytest.approx(fast["images_per_s"] / slow["images_per_s"])
    table = capsys.readouterr().out
    assert table.count("\n| optimized |") == 2 and table.count("\n| naive |") == 2
    assert markdown_table(report) in table


def test_bad_bench_options_fail_before_any_model_loads(tmp_path, capsys):
    out = str(tmp_path / "b.json")
    assert main(["bench", "--batch-sizes", "0,2", "-o", out]) == 2
    assert main(["bench", "--models", "paper", "-o", out]) == 2
    assert main(["bench", "--classes", "21", "-o", out]) == 2
    assert "between 1 and 20" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no benchmark"):
        BenchConfig(method="freeda")


def test_compile_failure_degrades_to_eager(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler here")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    report = run_bench(BenchConfig(models="tiny", resolution=64, batch_sizes=(1,), repeats=1, warmup=0, classes=1,
                                   naive=False, compile=True, device="cpu"))
    assert report["compile"].startswith("failed, eager instead: RuntimeError: no C++ compiler here")
    assert [r["impl"] for r in report["rows"]] == ["optimized"]


def test_diffsegmenter_batched_classes_equal_one_pass_per_class():
    report = run_bench(BenchConfig(method="diffsegmenter", models="tiny", resolution=RES, batch_sizes=(2,),
                                   repeats=1, warmup=0, classes=3, device="cpu"))
    assert [r["impl"] for r in report["rows"]] == ["optimized", "per_class"]
    (comp,) = report["comparisons"]
    assert comp["baseline"] == "per_class" and comp["max_abs_diff"] < 1e-3


# ---------------------------------------------------------------------------------------------------
# Full-size random models (never allocated here)
# ---------------------------------------------------------------------------------------------------
def test_random_full_has_the_published_sd15_sizes_on_the_meta_device():
    dm = build_random_full("meta")
    counts = {name: sum(p.numel() for p in getattr(dm, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert all(p.is_meta for m in (dm.unet, dm.vae, dm.text_encoder) for p in m.parameters())
    assert dm.native_resolution == 512 and dm.vae_scale == pytest.approx(0.18215)
    assert len(dm.tokenizer) == 49408
    dm.scheduler.set_timesteps(1)
    assert dm.scheduler.timesteps.tolist() == [1]  # the pipeline's steps_offset=1 (faseg.md §2)
    assert dm.unet.config.attention_head_dim == 8 and dm.unet.config.cross_attention_dim == 768
    assert build_random_full("meta", dtype="float16").unet.dtype == torch.float16


def test_materialise_fills_a_meta_model_with_the_seeded_init():
    from transformers import CLIPTextConfig, CLIPTextModel

    def build():
        with torch.device("meta"):
            model = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                                 pad_token_id=1))
        _materialise(model, torch.device("cpu"), torch.Generator().manual_seed(0))
        return model

    model = build()
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    fc1 = model.get_submodule("encoder.layers.0.mlp.fc1")
    assert fc1.weight.abs().max() <= 1 / 16**0.5 and fc1.weight.std() > 0.5 / (3 * 16) ** 0.5  # U(±1/√fan_in)
    assert torch.equal(model.get_submodule("final_layer_norm").weight, torch.ones(16))
    emb = model.get_submodule("embeddings.token_embedding").weight.detach()
    assert 0.01 < float(emb.std()) < 0.03  # CLIP's N(0, 0.02)
    assert torch.equal(model.get_buffer("embeddings.position_ids")[0], torch.arange(77))
    assert all(torch.equal(a, b) for a, b in zip(params.values(), build().parameters()))  # seeded
    out = model(torch.tensor([[1, 2, 3]]))[0]
    assert torch.isfinite(out).all()


def test_random_source_is_accepted_by_modelset_for_diffusion_only():
    models = ModelSet("faseg", "random", device="cpu")
    assert models.sources()["diffusion"] == "random"
    with pytest.raises(ModelNotFoundError, match="diffusion kind only"):
        load_component("clip", "random", device="cpu")
    with pytest.raises(ModelNotFoundError, match="diffusion kind only"):
        ModelSet("faseg", {"diffusion": "tiny", "captioner": "random"}, device="cpu")["captioner"]
