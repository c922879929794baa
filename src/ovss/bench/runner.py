"""`ovss bench`: time a method against its straightforward baseline, side by side in one process.

Why in one process: ratios measured minutes apart on a shared machine mix in its load (the same UNet forward
has measured 6.4 s and 19 s here); alternating the two implementations on the same images, weights and
device gives a ratio that survives the noise. Timings start from decoded images with given candidates and a
given caption, as the FA-Seg paper's Table 2 does (candidate extraction and captioning excluded).

FA-Seg: `optimized` is `ovss.create("faseg")` (batched images, flip in the batch, on-the-fly attention means,
block-sum affinities); `naive` is `ovss.bench.naive_faseg.NaiveFASeg`. DiffSegmenter: `optimized` runs all
classes of a batch in one batched UNet pass; `per_class` runs one pass per class and image.
"""
from __future__ import annotations

import datetime
import logging
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

import ovss
from ovss.bench.naive_faseg import NaiveFASeg

log = logging.getLogger(__name__)

#: PASCAL VOC's 20 class names: `--classes K` benchmarks the first K as every image's candidate list.
BENCH_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                 "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
                 "tv monitor")
#: The given caption (FA-Seg's P_t prefix); its content does not change the cost.
BENCH_CAPTION = "a photograph of a street with people, animals and vehicles"
MODELS = ("tiny", "random")
METHODS = ("faseg", "diffsegmenter")
#: RSS sampling period of the CPU peak-memory thread (seconds).
RSS_INTERVAL_S = 0.005

Output = tuple[torch.Tensor, np.ndarray]  # one image's candidate scores (K, h, w) and its label map


@dataclass
class BenchConfig:
    """What `ovss bench` runs; every field is a CLI flag."""

    method: str = "faseg"
    models: str = "tiny"  # tiny: seconds, CI-safe; random: full-size SD-1.5 shapes with random weights
    batch_sizes: tuple[int, ...] = (1, 4)
    repeats: int = 5
    warmup: int = 1
    device: str | None = None
    dtype: str | None = None
    classes: int = 3
    naive: bool = True  # also run the baseline, for the speedup and the output check
    compile: bool = False  # torch.compile the UNet of the optimized runs (eager if compiling fails)
    resolution: int | None = None  # None: the model's native size (512 for SD-1.5)
    threads: int | None = None  # torch intra-op threads (CPU); None: torch's default
    seed: int = 0  # images and method noise

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"bench: method {self.method!r} has no benchmark; choose one of {METHODS}")
        if self.models not in MODELS:
            raise ValueError(f"bench: models {self.models!r}; choose one of {MODELS} (no downloads needed)")
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"bench: batch sizes must be >= 1, got {self.batch_sizes}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("bench: repeats must be >= 1 and warmup >= 0")
        if not 1 <= self.classes <= len(BENCH_CLASSES):
            raise ValueError(f"bench: classes must be between 1 and {len(BENCH_CLASSES)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError("bench: threads must be >= 1")


class PeakMemory:
    """Peak memory of a region. CUDA: `torch.cuda.max_memory_allocated`; CPU: the process RSS high-water,
    sampled by a thread every RSS_INTERVAL_S (tensor memory is not visible to tracemalloc)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.cuda else "rss_sampled"

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self.base = self.peak = proc.memory_info().rss
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, args=(proc,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, proc) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            import psutil

            self.peak = max(self.peak, psutil.Process().memory_info().rss)


class _OOMCounter(logging.Handler):
    """Counts the base class's "out of memory ... retrying with batches of N" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "out of memory" in record.getMessage():
            self.count += 1


@dataclass
class Row:
    """One implementation at one batch size: raw repeat times and the summary statistics."""

    impl: str
    batch: int
    times_s: list[float]
    cpu_times_s: list[float]  # process CPU time (all threads) per repeat: on a shared CPU, less load-dependent
    peak_memory_bytes: int
    memory_delta_bytes: int
    memory_kind: str
    oom_halvings: int = 0
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = sorted(self.times_s)
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else (t[0],) * 3
        median = statistics.median(t)
        self.stats = {"median_s": median, "q1_s": q1, "q3_s": q3, "min_s": t[0], "max_s": t[-1],
                      "s_per_image": median / self.batch, "images_per_s": self.batch / median,
                      "median_cpu_s": statistics.median(self.cpu_times_s)}


class _Compiler:
    """`torch.compile` of the UNet's forward, switched on only around the optimized runs; falls back to eager
    (and records why) when compiling or the first compiled call fails, e.g. without a C++ toolchain."""

    def __init__(self, unet: torch.nn.Module, enabled: bool):
        self.unet = unet
        self.fn = None
        self.status = "off"
        if enabled:
            try:
                self.fn = torch.compile(unet.forward)
                self.status = "on"
            except Exception as err:  # noqa: BLE001 - any compile failure degrades to eager
                self.fail(err)

    def fail(self, err: BaseException) -> None:
        self.fn = None
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        self.status = f"failed, eager instead: {type(err).__name__}: {first_line}"
        log.warning("bench: torch.compile %s", self.status)

    def __enter__(self) -> _Compiler:
        if self.fn is not None:
            self.unet.forward = self.fn
        return self

    def __exit__(self, *exc) -> None:
        vars(self.unet).pop("forward", None)  # the class's eager forward again


def bench_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """n distinct smooth colour images (8×8 random colours, bicubic-upsampled, plus pixel noise), size×size."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical cores)"


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"ovss": ovss.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


class _Setup:
    """The method under test, its baseline and the UNet, built once for every batch size."""

    def __init__(self, cfg: BenchConfig):
        names = list(BENCH_CLASSES[:cfg.classes])
        self.names = names
        if cfg.method == "faseg":
            self.method = ovss.create("faseg", models=cfg.models, device=cfg.device, dtype=cfg.dtype,
                                      candidates="given", caption="given", resolution=cfg.resolution, seed=cfg.seed)
            self.resolution = self.method.resolution
            self.baseline_name = "naive"
            naive = NaiveFASeg(self.method.models["diffusion"], self.method.config, self.resolution)
            self._baseline = lambda images: [(r.scores, r.labels) for r in
                                             (naive.segment(im, names, BENCH_CAPTION) for im in images)]
        else:
            self.method = ovss.create("diffsegmenter", models=cfg.models, device=cfg.device, dtype=cfg.dtype,
                                      candidates="given", blip_completion=False, seed=cfg.seed)
            self.method.config.resolution = cfg.resolution or self.method.models["diffusion"].native_resolution
            self.resolution = self.method.config.resolution
            self.baseline_name = "per_class"
            self._baseline = self._per_class
        self.unet = self.method.models["diffusion"].unet

    def _segment(self, images: list[Image.Image], batch_size: int) -> list[Output]:
        n = len(images)
        segs = self.method.segment_many(images, self.names, batch_size=batch_size, given=[self.names] * n,
                                        captions=[BENCH_CAPTION] * n)
        return [(torch.from_numpy(s.scores_lowres[1:]), s.labels) for s in segs]

    def optimized(self, images: list[Image.Image]) -> list[Output]:
        """All images in one batch; DiffSegmenter: every (image, class) item in one UNet call."""
        if self.baseline_name == "per_class":
            self.method.config.max_unet_batch = len(images) * len(self.names)
        return self._segment(images, len(images))

    def _per_class(self, images: list[Image.Image]) -> list[Output]:
        self.method.config.max_unet_batch = 1
        return self._segment(images, 1)

    def baseline(self, images: list[Image.Image]) -> list[Output]:
        return self._baseline(images)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(impl: str, fn: Callable[[list[Image.Image]], list[Output]], images: list[Image.Image],
             cfg: BenchConfig, device: torch.device, compiler: _Compiler | None = None
             ) -> tuple[Row, list[Output]]:
    """Warm-up runs, then `repeats` timed runs of fn(images) inside one peak-memory region."""
    compiled = compiler is not None and compiler.fn is not None
    for _ in range(max(cfg.warmup, 1) if compiled else cfg.warmup):  # a compiled UNet compiles in its first call
        try:
            fn(images)
        except Exception as err:  # noqa: BLE001 - a failing compiled call degrades to eager; others raise
            if compiler is None or compiler.fn is None:
                raise
            compiler.fail(err)
            vars(compiler.unet).pop("forward", None)
            fn(images)
    counter = _OOMCounter()
    base_log = logging.getLogger("ovss.methods.base")
    base_log.addHandler(counter)
    times, cpu_times = [], []
    try:
        with PeakMemory(device) as mem:
            for _ in range(cfg.repeats):
                _sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                outputs = fn(images)
                _sync(device)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    finally:
        base_log.removeHandler(counter)
    row = Row(impl, len(images), times, cpu_times, mem.peak, mem.peak - mem.base, mem.kind, counter.count)
    return row, outputs


def _compare(a: list[Output], b: list[Output]) -> dict[str, float]:
    """Max abs score difference and label agreement between two implementations' outputs."""
    diff = max(float((x[0].float() - y[0].float()).abs().max()) for x, y in zip(a, b))
    agree = float(np.mean(np.concatenate([(x[1] == y[1]).ravel() for x, y in zip(a, b)])))
    return {"max_abs_diff": diff, "label_agreement": agree}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; returns the report (what `ovss bench -o` writes as JSON)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    setup = _Setup(cfg)
    build_s = time.perf_counter() - t0
    method = setup.method
    device = method.device
    compiler = _Compiler(setup.unet, cfg.compile)
    images = bench_images(max(cfg.batch_sizes), setup.resolution, cfg.seed)
    rows, comparisons = [], []
    for bs in cfg.batch_sizes:
        batch = images[:bs]
        with compiler:
            row, fast = _measure("optimized", setup.optimized, batch, cfg, device, compiler)
        rows.append(row)
        if cfg.naive:
            base_row, slow = _measure(setup.baseline_name, setup.baseline, batch, cfg, device)
            rows.append(base_row)
            comparisons.append({"batch": bs, "baseline": setup.baseline_name,
                                "speedup": row.stats["images_per_s"] / base_row.stats["images_per_s"],
                                **_compare(fast, slow)})
    return {
        "method": cfg.method, "models": cfg.models, "device": str(device), "device_name": _device_name(device),
        "dtype": str(method.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "resolution": setup.resolution, "classes": setup.names, "caption": BENCH_CAPTION,
        "compile": compiler.status, "config": asdict(cfg), "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_build_s": build_s,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": [{**{k: v for k, v in asdict(r).items() if k != "stats"}, **r.stats} for r in rows],
        "comparisons": comparisons,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (one line per implementation and batch size), with a header line."""
    by_batch = {c["batch"]: c for c in report["comparisons"]}
    mem = "peak GPU mem" if report["device"].startswith("cuda") else "peak RSS (Δ)"
    lines = [f"**{report['method']}**, models={report['models']}, {report['device_name']}, {report['dtype']}, "
             f"{report['resolution']}², {len(report['classes'])} classes, {report['threads']} threads, "
             f"compile {report['compile']}, {report['date']}",
             "",
             f"| impl | batch | median s/batch | IQR s | s/image | images/s | process CPU s | {mem} | speedup | "
             "max abs Δ scores | label agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        comp = by_batch.get(r["batch"]) if r["impl"] == "optimized" else None
        memory = (_gib(r["peak_memory_bytes"]) if report["device"].startswith("cuda")
                  else f"{_gib(r['peak_memory_bytes'])} ({_gib(r['memory_delta_bytes'])})")
        extra = (f"{comp['speedup']:.2f}× | {comp['max_abs_diff']:.2e} | {100 * comp['label_agreement']:.2f} %"
                 if comp else "| |")
        lines.append(f"| {r['impl']} | {r['batch']} | {r['median_s']:.3f} | {r['q1_s']:.3f}–{r['q3_s']:.3f} | "
                     f"{r['s_per_image']:.3f} | {r['images_per_s']:.2f} | {r['median_cpu_s']:.2f} | {memory} | "
                     f"{extra} |")
    return "\n".join(lines)

