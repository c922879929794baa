"""Seeded K-means in torch (CPU or GPU), following sklearn's `KMeans(init="k-means++", n_init=1, algorithm="lloyd")`.

OVDiff clusters up to ~10⁵ SD feature vectors of 7680 dimensions per class with sklearn, which is where most
of its prototype time goes; the same algorithm on the GPU is a matrix product per iteration. The steps match
sklearn (greedy k-means++ with 2 + ⌊ln K⌋ local trials, Lloyd iterations, tolerance scaled by the mean
feature variance, strict convergence on unchanged labels, empty clusters re-seeded with the farthest points);
the random draws differ, so centroids are not bit-identical to sklearn's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: distance rows computed per matrix product: bounds memory at chunk × K floats
_CHUNK = 65536


@dataclass
class KMeansResult:
    centers: torch.Tensor  # (K, D), float32
    labels: torch.Tensor  # (N,), long
    inertia: float  # Σ squared distance of every point to its centre
    n_iter: int


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N, K) squared Euclidean distances, clamped at 0 against rounding."""
    out = torch.empty(x.shape[0], c.shape[0], dtype=torch.float32, device=x.device)
    c_sq = (c * c).sum(1)
    for s in range(0, x.shape[0], _CHUNK):
        xs = x[s:s + _CHUNK]
        out[s:s + _CHUNK] = (x_sq[s:s + _CHUNK, None] - 2 * xs @ c.T + c_sq[None]).clamp_(min=0)
    return out


def _assign(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and squared distance to the assigned centre, chunked so (N, K) never exists at once."""
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], _CHUNK):
        d = _sq_dists(x[s:s + _CHUNK], x_sq[s:s + _CHUNK], c)
        dist[s:s + _CHUNK], labels[s:s + _CHUNK] = d.min(1)
    return labels, dist


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (sklearn's `_kmeans_plusplus`): indices of the K initial centres."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    idx = [first]
    closest = _sq_dists(x, x_sq, x[first:first + 1])[:, 0]
    for _ in range(1, k):
        pot = closest.sum()
        r = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * pot.double()
        cand = torch.searchsorted(closest.double().cumsum(0), r).clamp_(max=n - 1)
        d = _sq_dists(x, x_sq, x[cand])  # (N, trials)
        pots = torch.minimum(closest[:, None], d).sum(0)
        best = int(pots.argmin())
        idx.append(int(cand[best]))
        closest = torch.minimum(closest, d[:, best])
    return torch.tensor(idx, device=x.device)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 300, tol: float = 1e-4) -> KMeansResult:
    """Cluster the rows of `x` (N, D) into K groups; float32 on x's device.

    Stops when no label changes, or when the summed squared centre shift is ≤ tol · mean per-feature variance
    (sklearn's rule); labels are then recomputed for the final centres. Needs N ≥ K.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects (N, D) data, got {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: K={k} clusters need 1 <= K <= N={n} points")
    x = x.float()
    generator = torch.Generator("cpu").manual_seed(seed)
    tol_abs = tol * float(x.var(0, unbiased=False).mean())
    x_sq = (x * x).sum(1)
    centers = x[kmeans_plusplus(x, k, generator)].clone()
    labels = None
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        new_labels, dist = _assign(x, x_sq, centers)
        counts = torch.bincount(new_labels, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # re-seed empty clusters with the points farthest from their centres
            far = dist.topk(len(empty)).indices
            new_labels[far] = empty
            counts = torch.bincount(new_labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, new_labels, x)
        new_centers = sums / counts[:, None].clamp(min=1)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if labels is not None and torch.equal(labels, new_labels):
            converged = True
            labels = new_labels
            break
        labels = new_labels
        if shift <= tol_abs:
            break
    if not converged:
        labels, dist = _assign(x, x_sq, centers)
    else:
        dist = ((x - centers[labels]) ** 2).sum(1)
    return KMeansResult(centers, labels, float(dist.sum()), it)
