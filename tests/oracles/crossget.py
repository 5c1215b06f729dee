"""CrossGET's complete-graph matching, one token at a time (METHODS.md, CrossGET; the official
reducer's ranking, adjusted similarity and source choice, without the cross-modal token)."""

from __future__ import annotations

import math

import torch

from .tome import _dot, _unit


def _tokens(t: torch.Tensor, b: int) -> list[list[float]]:
    """Row ``b`` as unit lists; keys/queries ``[B, H, N, d]`` have their heads concatenated (token
    i's vector is head 0's d values, then head 1's, ...), as the official in-projection."""
    if t.dim() == 4:
        rows = [[float(v) for h in range(t.shape[1]) for v in t[b, h, i]] for i in range(t.shape[2])]
        return [_unit(row) for row in rows]
    t = t[b]
    return [_unit(row.tolist()) for row in t]


def crossget_match(metric, query, r, protected, size=None):
    """Returns ``dest [B, N]`` and ``w [B, N, 1]`` (size · exp(importance − importance of the
    group's kept token)), fp64."""
    batch, n = metric.shape[0], metric.shape[-2]
    dests, weights = [], []
    for b in range(batch):
        unit = _tokens(metric, b)
        guide = _tokens(query, b)[0] if protected else None
        importance = [_dot(unit[i], guide) if guide else 0.0 for i in range(n)]
        free = list(range(protected, n))

        def sim(i, j):
            return _dot(unit[i], unit[j])

        best = {i: max((sim(i, j) for j in free if j != i), default=-math.inf) for i in free}
        by_best = sorted(free, key=lambda i: (-best[i], i))  # descending, ties: lower index first
        place = {i: p for p, i in enumerate(by_best)}
        score = {}
        for i in free:
            later = [sim(i, j) for j in free if place[j] > place[i]]
            score[i] = (max(later) if later else -math.inf) - importance[i]
        sources = set(sorted(free, key=lambda i: (-score[i], i))[:r])
        kept = [i for i in range(n) if i not in sources]
        slot = {i: s for s, i in enumerate(kept)}
        dest, anchor = [0] * n, list(range(n))
        for i in range(n):
            if i in sources:
                where, top = None, -math.inf
                for j in free:  # strict: the lowest index wins a tie
                    if j not in sources and j != i and (where is None or sim(i, j) > top):
                        where, top = j, sim(i, j)
                dest[i], anchor[i] = slot[where], where
            else:
                dest[i] = slot[i]
        dests.append(dest)
        sizes = [1.0 if size is None else float(size[b, i, 0]) for i in range(n)]
        # softmax weights within each group, scaled so that the group's kept token weighs its size
        weights.append([sizes[i] * math.exp(importance[i] - importance[anchor[i]]) for i in range(n)])
    return torch.tensor(dests, dtype=torch.int64), torch.tensor(weights, dtype=torch.float64)[..., None]
