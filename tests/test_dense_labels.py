"""The shared label rules: background threshold ties, and nearest label resizing identical to PIL."""
import numpy as np
import pytest
import torch
from PIL import Image

from ovss.dense.labels import labels_with_background, labels_without_background, resize_labels


@pytest.mark.parametrize("size_hw", [(375, 500), (333, 500), (21, 33), (1000, 700), (7, 1000), (3, 7), (511, 513)])
@pytest.mark.parametrize("src_hw", [(512, 512), (64, 96)])
def test_resize_labels_equals_pil_nearest(size_hw, src_hw):
    lab = np.random.default_rng(sum(size_hw)).integers(0, 21, src_hw).astype(np.uint8)
    ref = np.array(Image.fromarray(lab, mode="L").resize(size_hw[::-1], Image.NEAREST))
    got = resize_labels(torch.from_numpy(lab), size_hw)
    assert got.shape == size_hw and np.array_equal(got, ref)
    assert set(np.unique(got)) <= set(np.unique(lab))


def test_background_rule_ties():
    s = torch.tensor([[[0.5, 0.2], [0.7, 0.1]], [[0.1, 0.5], [0.7, 0.4]]])  # 2 classes, 2x2
    assert labels_with_background(s, 0.5, ties="class").tolist() == [[1, 2], [1, 0]]
    assert labels_with_background(s, 0.5, ties="background").tolist() == [[0, 0], [1, 0]]
    assert labels_with_background(s[:0], 0.5).tolist() == [[0, 0], [0, 0]]
    assert labels_without_background(s).tolist() == [[0, 1], [0, 1]]  # first index wins ties
