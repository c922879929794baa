"""Small attention-map operations shared by FA-Seg and DiffSegmenter."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def minmax(x: torch.Tensor, dims: int | Sequence[int]) -> torch.Tensor:
    """(x - min) / (max - min) over `dims`; a constant map gives zeros instead of the official 0/0 NaN."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    lo = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def tokens_to_grid(maps: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, T) query-major attention -> (B, T, h, w) per-token images."""
    h, w = grid_hw
    b, n, t = maps.shape
    if n != h * w:
        raise ValueError(f"{n} queries do not form a {h}x{w} grid")
    return maps.transpose(1, 2).reshape(b, t, h, w)
