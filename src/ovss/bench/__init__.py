"""Benchmarks: `ovss bench` (runner) and the straightforward FA-Seg it is measured against (naive_faseg)."""
from ovss.bench.naive_faseg import NaiveFASeg, NaiveResult
from ovss.bench.runner import BENCH_CAPTION, BENCH_CLASSES, BenchConfig, bench_images, markdown_table, run_bench

__all__ = ["BenchConfig", "run_bench", "markdown_table", "bench_images", "NaiveFASeg", "NaiveResult",
           "BENCH_CLASSES", "BENCH_CAPTION"]
