"""FPET's checkerboard matching, one token at a time (METHODS.md, FPET; the official split order)."""

from __future__ import annotations

import math

import torch


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def refine(metric: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``k + up · relu(down · k)`` per token, entry by entry."""
    batch, n, d = metric.shape
    h = down.shape[0]
    out = metric.clone()
    for b in range(batch):
        for i in range(n):
            k = metric[b, i].tolist()
            hidden = [max(0.0, sum(float(down[j, c]) * k[c] for c in range(d))) for j in range(h)]
            for c in range(d):
                out[b, i, c] = k[c] + sum(float(up[c, j]) * hidden[j] for j in range(h))
    return out


def fpet_match(metric: torch.Tensor, r: int, protected: int, down=None, up=None, with_tied=False):
    """``[B, N, d] -> dest [B, N]``; the patches after the protected tokens form a square grid.
    ``with_tied``: also return, per image, the sources whose two best scores are equal (the
    official rule drops them)."""
    if down is not None:
        metric = refine(metric, down, up)
    batch, n, _ = metric.shape
    if r == 0:  # no merge: the order is left alone
        dest = torch.arange(n).expand(batch, n).clone()
        return (dest, [set() for _ in range(batch)]) if with_tied else dest
    t = n - protected
    side = math.isqrt(t)
    assert side * side == t
    cell = {protected + row * side + col: (row, col) for row in range(side) for col in range(side)}

    def group(pr: int, pc: int) -> list[int]:
        return [i for i in sorted(cell) if cell[i][0] % 2 == pr and cell[i][1] % 2 == pc]

    side_a = group(0, 0) + group(1, 1)
    side_b = group(1, 0) + group(0, 1)
    out, tied = [], []
    for b in range(batch):
        best, partner, row = {}, {}, {}
        for i in side_a:
            for j in side_b:
                s = _cos(metric[b, i].tolist(), metric[b, j].tolist())
                row.setdefault(i, []).append(s)
                if i not in best or s > best[i]:  # strict: the first B token in order wins a tie
                    best[i], partner[i] = s, j
        place = {i: k for k, i in enumerate(side_a)}
        ranked = sorted(best, key=lambda i: (-best[i], place[i]))
        sources = set(ranked[:r])
        # hard = score > mean of the top two: no entry passes when the two best are equal
        tied.append({i for i in sources if len(row[i]) > 1 and sorted(row[i])[-1] == sorted(row[i])[-2]})
        order = list(range(protected)) + [i for i in side_a if i not in sources] + side_b
        slot = {tok: s for s, tok in enumerate(order)}
        for i in sources:
            slot[i] = slot[partner[i]]
        out.append([slot[i] for i in range(n)])
    dest = torch.tensor(out, dtype=torch.int64)
    return (dest, tied) if with_tied else dest
