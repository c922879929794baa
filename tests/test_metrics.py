"""Confusion-matrix metric against a direct per-class restatement of evaluation.md §5."""
import json
import math

import numpy as np
import pytest

from ovss.eval.metrics import ConfusionMatrix, image_iou, per_image_miou

IGNORE = 255


def direct_iou(pairs, num_classes, ignore=IGNORE):
    """Per-class loops over pixels: TP, GT and P counts over all images, IoU = TP / (GT + P - TP)."""
    tp = np.zeros(num_classes)
    gtc = np.zeros(num_classes)
    prc = np.zeros(num_classes)
    for pred, gt in pairs:
        for c in range(num_classes):
            valid = gt != ignore
            tp[c] += np.sum((pred == c) & (gt == c) & valid)
            gtc[c] += np.sum((gt == c) & valid)
            prc[c] += np.sum((pred == c) & valid)
    union = gtc + prc - tp
    return np.array([tp[c] / union[c] if union[c] > 0 else np.nan for c in range(num_classes)]), tp, gtc


def random_pairs(rng, n, num_classes, shape=(7, 9), absent=(), ignore_frac=0.2, pred_lo=0, pred_hi=None):
    pairs = []
    allowed = [c for c in range(num_classes) if c not in absent]
    for _ in range(n):
        gt = rng.choice(allowed, size=shape)
        gt[rng.random(shape) < ignore_frac] = IGNORE
        pred = rng.integers(pred_lo, pred_hi if pred_hi is not None else num_classes, size=shape)
        pred = np.where(np.isin(pred, absent), allowed[0], pred)
        pairs.append((pred, gt))
    return pairs


def accumulate(pairs, num_classes):
    cm = ConfusionMatrix(num_classes)
    for pred, gt in pairs:
        cm.update(pred, gt)
    return cm


def test_iou_matches_direct_computation():
    rng = np.random.default_rng(0)
    pairs = random_pairs(rng, 5, 6)
    cm = accumulate(pairs, 6)
    ref, tp, gtc = direct_iou(pairs, 6)
    np.testing.assert_allclose(cm.iou(), ref, rtol=0, atol=1e-12)
    s = cm.summary([f"c{i}" for i in range(6)])
    assert s["miou"] == pytest.approx(np.nanmean(ref) * 100)
    assert s["aacc"] == pytest.approx(tp.sum() / gtc.sum() * 100)
    assert s["n_images"] == 5
    assert s["n_valid_pixels"] == int(gtc.sum())
    assert s["per_class_iou"]["c3"] == pytest.approx(ref[3] * 100)


def test_matrix_entries_are_pixel_counts():
    gt = np.array([[0, 1, 1], [2, IGNORE, 2]])
    pred = np.array([[0, 2, 1], [2, 0, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    expected = np.zeros((3, 3), dtype=np.int64)
    for g, p in [(0, 0), (1, 2), (1, 1), (2, 2), (2, 1)]:
        expected[g, p] += 1
    np.testing.assert_array_equal(cm.hist, expected)


def test_absent_class_is_nan_and_means_differ():
    rng = np.random.default_rng(1)
    pairs = random_pairs(rng, 3, 5, absent=(4,))
    cm = accumulate(pairs, 5)
    iou = cm.iou()
    assert math.isnan(iou[4]) and not np.isnan(iou[:4]).any()
    s = cm.summary(list("abcde"))
    assert s["per_class_iou"]["e"] is None
    assert s["miou"] == pytest.approx(iou[:4].mean() * 100)
    assert s["miou_plain"] == pytest.approx(iou[:4].sum() / 5 * 100)
    assert s["miou"] > s["miou_plain"]


def test_out_of_range_predictions_are_misses():
    rng = np.random.default_rng(2)
    pairs = random_pairs(rng, 4, 4, pred_lo=-1, pred_hi=6)  # -1, 4, 5 are not classes
    cm = accumulate(pairs, 4)
    ref, _, gtc = direct_iou(pairs, 4)
    np.testing.assert_allclose(cm.iou(), ref, atol=1e-12)
    assert cm.pred_invalid.sum() > 0
    assert cm.summary(list("abcd"))["n_valid_pixels"] == int(gtc.sum())


def test_all_wrong_class_gives_zero_not_nan():
    cm = ConfusionMatrix(3)
    cm.update(np.full((2, 2), 7), np.zeros((2, 2), dtype=np.int64))
    iou = cm.iou()
    assert iou[0] == 0.0 and np.isnan(iou[1:]).all()


def test_merge_equals_single_accumulation():
    rng = np.random.default_rng(3)
    pairs = random_pairs(rng, 6, 5, pred_hi=7)
    whole = accumulate(pairs, 5)
    a, b = accumulate(pairs[:2], 5), accumulate(pairs[2:], 5)
    a.merge(b)
    np.testing.assert_array_equal(a.hist, whole.hist)
    np.testing.assert_array_equal(a.pred_invalid, whole.pred_invalid)
    assert a.n_images == 6
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))


def test_state_round_trip_through_json():
    rng = np.random.default_rng(4)
    pairs = random_pairs(rng, 3, 4, pred_hi=6)
    cm = accumulate(pairs, 4)
    restored = ConfusionMatrix.from_state_dict(json.loads(json.dumps(cm.state_dict())))
    names = list("abcd")
    assert restored.summary(names) == cm.summary(names)
    restored.update(*pairs[0])
    cm.update(*pairs[0])
    np.testing.assert_array_equal(restored.hist, cm.hist)


def test_shape_mismatch_and_bad_inputs_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((4, 5), dtype=np.int64), np.zeros((5, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.zeros((2, 2), dtype=np.int64), np.full((2, 2), 3))
    with pytest.raises(TypeError):
        cm.update(np.zeros((2, 2), dtype=np.float32), np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError):
        cm.summary(["a", "b"])
    assert cm.n_images == 0


def test_per_image_miou_averages_image_scores():
    rng = np.random.default_rng(5)
    pairs = random_pairs(rng, 4, 5, shape=(5, 6))
    expected = np.mean([np.nanmean(direct_iou([p], 5)[0]) for p in pairs]) * 100
    assert per_image_miou(pairs, 5) == pytest.approx(expected)
    np.testing.assert_allclose(image_iou(*pairs[0], 5), direct_iou([pairs[0]], 5)[0])
    # It is a different number from the dataset-level metric.
    assert per_image_miou(pairs, 5) != pytest.approx(accumulate(pairs, 5).summary(list("abcde"))["miou"])
    # An image with only ignored pixels does not count.
    empty = (np.zeros((2, 2), dtype=np.int64), np.full((2, 2), IGNORE))
    assert per_image_miou([*pairs, empty], 5) == pytest.approx(expected)
