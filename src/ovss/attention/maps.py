"""Small attention-map operations shared by FA-Seg and DiffSegmenter."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

#: attention-map sides 8/16/32/64 of a 512² SD input are UNet downsampling factors 8/4/2/1: the order in which
#: the methods list their per-side weights.
LEVEL_FACTORS = (8, 4, 2, 1)


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


def level_weights(weights: Sequence[float], available: set[int], kind: str) -> dict[int, float]:
    """Map the 4 per-side weights (sides 8/16/32/64 at 512²) to UNet factors present in this model.

    A model lacking a weighted level (tiny UNets) drops it and renormalises the rest to the original sum,
    since thresholds downstream are absolute.
    """
    by_factor = dict(zip(LEVEL_FACTORS, weights))
    kept = {f: w for f, w in by_factor.items() if f in available and w != 0}
    missing = {f: w for f, w in by_factor.items() if f not in available and w != 0}
    if not kept:
        raise ValueError(f"the UNet has no {kind}-attention level with a non-zero weight "
                         f"(weights by factor {by_factor}, levels present {sorted(available)})")
    if missing:
        total, kept_sum = sum(by_factor.values()), sum(kept.values())
        log.warning("%s-attention levels %s absent from this UNet; renormalising the others", kind, sorted(missing))
        kept = {f: w * total / kept_sum for f, w in kept.items()}
    return kept
