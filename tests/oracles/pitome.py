"""PiToMe's matching one token at a time (METHODS.md, PiToMe steps 1-6)."""

from __future__ import annotations

import math

import torch

from .tome import _dot, _unit


def _elu(v: float) -> float:
    return v if v > 0 else math.exp(v) - 1.0


def pitome_match(metric: torch.Tensor, r: int, protected: int, margin: float, bsm: bool) -> torch.Tensor:
    """``[B, N, d]`` -> ``dest [B, N]``."""
    batch, n, _ = metric.shape
    t = n - protected
    out = []
    for b in range(batch):
        if r == 0:
            out.append(list(range(n)))
            continue
        tok = [_unit(metric[b, protected + i].tolist()) for i in range(t)]
        sim = [[_dot(tok[i], tok[j]) for j in range(t)] for i in range(t)]
        energy = [sum(_elu(sim[i][j] - margin) for j in range(t)) / t for i in range(t)]
        order = sorted(range(t), key=lambda i: (-energy[i], i))
        if bsm:
            side_a, side_b = order[0::2], order[1::2]
        else:
            side_a, side_b = order[0 : 2 * r : 2], order[1 : 2 * r : 2]
        partner, best = {}, {}
        for a in side_a:
            for j in side_b:  # in energy order: the first best wins a tie
                if a not in best or sim[a][j] > best[a]:
                    best[a], partner[a] = sim[a][j], j
        if bsm:
            place = {a: p for p, a in enumerate(side_a)}
            sources = set(sorted(side_a, key=lambda a: (-best[a], place[a]))[:r])
            kept = [a for a in side_a if a not in sources]
        else:
            sources, kept = set(side_a), order[2 * r :]
        layout = kept + side_b
        slot = {tk: protected + s for s, tk in enumerate(layout)}
        for a in sources:
            slot[a] = slot[partner[a]]
        out.append(list(range(protected)) + [slot[i] for i in range(t)])
    return torch.tensor(out, dtype=torch.int64)
