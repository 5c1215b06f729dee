"""FPET's checkerboard matching, one token at a time (METHODS.md, FPET; the official split order)."""

from __future__ import annotations

import math

import torch


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def fpet_match(metric: torch.Tensor, r: int, protected: int) -> torch.Tensor:
    """``[B, N, d] -> dest [B, N]``; the patches after the protected tokens form a square grid."""
    batch, n, _ = metric.shape
    if r == 0:  # no merge: the order is left alone
        return torch.arange(n).expand(batch, n).clone()
    t = n - protected
    side = math.isqrt(t)
    assert side * side == t
    cell = {protected + row * side + col: (row, col) for row in range(side) for col in range(side)}

    def group(pr: int, pc: int) -> list[int]:
        return [i for i in sorted(cell) if cell[i][0] % 2 == pr and cell[i][1] % 2 == pc]

    side_a = group(0, 0) + group(1, 1)
    side_b = group(1, 0) + group(0, 1)
    out = []
    for b in range(batch):
        best, partner = {}, {}
        for i in side_a:
            for j in side_b:
                s = _cos(metric[b, i].tolist(), metric[b, j].tolist())
                if i not in best or s > best[i]:  # strict: the first B token in order wins a tie
                    best[i], partner[i] = s, j
        place = {i: k for k, i in enumerate(side_a)}
        ranked = sorted(best, key=lambda i: (-best[i], place[i]))
        sources = set(ranked[:r])
        order = list(range(protected)) + [i for i in side_a if i not in sources] + side_b
        slot = {tok: s for s, tok in enumerate(order)}
        for i in sources:
            slot[i] = slot[partner[i]]
        out.append([slot[i] for i in range(n)])
    return torch.tensor(out, dtype=torch.int64)
