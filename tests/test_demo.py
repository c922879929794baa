"""`ovss demo` (README's main job) on tiny models: outputs written, baselines computed honestly."""
import json

import numpy as np
from PIL import Image

from ovss.cli import main
from ovss.toy import TOY_CLASSES, iter_scenes


def test_demo_on_tiny_models_writes_grid_overlays_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "-o", str(out), "--models", "tiny", "--n", "2", "--size", "48", "--methods", "faseg"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TINY RANDOM-WEIGHT" in printed and "| faseg |" in printed
    grid = Image.open(out / "grid.png")
    assert grid.width > 3 * 48 and grid.height > 2 * 48  # scene | truth | faseg, two rows
    assert (out / "faseg" / "scene0.png").exists() and (out / "faseg" / "scene1_overlay.png").exists()
    res = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    # the most-frequent-class baseline recomputed independently: IoU(c*) = its pixel share, every other class 0
    truths = [s.labels_full for s in iter_scenes("test", 2, size=48)]
    counts = np.bincount(np.concatenate([t.ravel() for t in truths]), minlength=len(TOY_CLASSES))
    top = int(counts.argmax())
    expected = 100 * counts[top] / counts.sum() / np.count_nonzero(counts)
    assert abs(rows[f"baseline: most_frequent ({TOY_CLASSES[top]})"]["miou"] - expected) < 1e-6
    assert "baseline: caption_prior" in rows
    assert 0 <= rows["faseg"]["miou"] <= 100
    labels = np.array(Image.open(out / "faseg" / "scene0.png"))
    assert labels.shape == (48, 48) and labels.max() < len(TOY_CLASSES)


def test_demo_reports_a_failing_method_and_exits_nonzero(tmp_path, capsys):
    code = main(["demo", "-o", str(tmp_path), "--models", "tiny", "--n", "1", "--size", "32", "--methods", "nosuch"])
    assert code == 1
    assert "nosuch" in capsys.readouterr().out
