"""Distributed bank building on a local Ray cluster (2 CPUs, 2 workers) equals the single-process build."""
from __future__ import annotations

import json

import pytest
import torch

from ovss.banks.bank import Bank
from ovss.banks.build import BuildConfig, build_local, build_ray, make_models, read_captions

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ovss[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ovss[ray]')")

CAPTIONS = """A man riding a wave on top of a surfboard.
Two dogs sitting on a red couch next to a window.
The cat is sleeping on the bed.
A plate of food with broccoli and carrots.
A giraffe standing in a field under a blue sky.
A boat on the water near a house.
"""


def test_two_ray_workers_build_the_same_bank_as_one_process(tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_text(CAPTIONS)
    config = BuildConfig(steps=2, resolution=64, batch_size=2, chunk_rows=2)
    # Same thread count as the workers: on a CPU, matmul reduction order (so the last bits) depends on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, single = build_local(read_captions(caps), tmp_path / "single", config, make_models("tiny", "cpu"))
    finally:
        torch.set_num_threads(threads)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        reports, distributed = build_ray(caps, tmp_path / "ray", config, workers=2, n_shards=3, models="tiny",
                                         device="cpu", threads_per_worker=1)
    finally:
        ray.shutdown()

    assert [r["shard"] for r in reports] == [0, 1, 2]
    assert sum(r["captions"] for r in reports) == 6
    a, b = Bank(single), Bank(distributed)
    assert len(a) == len(b) > 0
    for pa, pb in zip(a.parts, b.parts):
        assert (a.root / pa["file"]).read_bytes() == (b.root / pb["file"]).read_bytes()
    ma, mb = (json.loads((bank / "manifest.json").read_text()) for bank in (single, distributed))
    for m in (ma, mb):
        m["data"].pop("built_seconds")
    assert ma == mb
