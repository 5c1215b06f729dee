"""ATC's clustering, one image and one merge at a time, linkages recomputed from the members."""

from __future__ import annotations

import math

import torch


def _distance(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return 1.0 - dot / (nu * nv)


def cluster(points: list[list[float]], n_clusters: int, linkage: str = "average") -> list[int]:
    """``linkage`` (average: the mean pairwise distance between two clusters, complete: the largest,
    single: the smallest) on ``1 - cos`` down to ``n_clusters``; each point's cluster, numbered by
    the clusters' lowest members. Ties: the pair with the smallest (lowest member, lowest member)."""
    t = len(points)
    d = [[_distance(points[i], points[j]) for j in range(t)] for i in range(t)]
    clusters = [[i] for i in range(t)]  # kept sorted by lowest member
    while len(clusters) > n_clusters:
        best = None
        for x in range(len(clusters)):
            for y in range(x + 1, len(clusters)):
                pairs = [d[i][j] for i in clusters[x] for j in clusters[y]]
                if linkage == "average":
                    link = sum(pairs) / (len(clusters[x]) * len(clusters[y]))
                else:
                    link = max(pairs) if linkage == "complete" else min(pairs)
                if best is None or link < best[0]:  # strict: the first pair in order wins a tie
                    best = (link, x, y)
        _, x, y = best
        clusters[x] = sorted(clusters[x] + clusters[y])
        del clusters[y]
    label = [0] * t
    for k, members in enumerate(clusters):
        for i in members:
            label[i] = k
    return label


def atc_match(metric: torch.Tensor, r: int, protected: int, linkage: str = "average") -> torch.Tensor:
    """``[B, N, d] -> dest [B, N]``: protected tokens first, then the clusters by lowest member."""
    batch, n, _ = metric.shape
    out = []
    for b in range(batch):
        points = [metric[b, i].tolist() for i in range(protected, n)]
        labels = cluster(points, n - protected - r, linkage)
        out.append(list(range(protected)) + [protected + k for k in labels])
    return torch.tensor(out, dtype=torch.int64)
