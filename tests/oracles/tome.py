"""ToMe's matching and the destination-map merge, one token at a time (METHODS.md, ToMe steps 1-5)."""

from __future__ import annotations

import math

import torch


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(t * t for t in v))
    return [t / norm for t in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def attention_row(q, k, size, b: int, h: int, i: int, scale: float, prop_attn: bool) -> list[float]:
    """Query ``i``'s attention over the keys ``j`` (image ``b``, head ``h``), one key at a time:
    ``softmax_j(q_i·k_j·scale + log size_j)``, the ``log size`` term only with ``prop_attn`` and sizes."""
    logits = []
    for j in range(k.shape[2]):
        v = _dot(q[b, h, i].tolist(), k[b, h, j].tolist()) * scale
        if prop_attn and size is not None:
            v += math.log(float(size[b, j, 0]))
        logits.append(v)
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    total = sum(e)
    return [v / total for v in e]


def bipartite_match(metric: torch.Tensor, r: int, protected: int, drop_sources: bool = False) -> torch.Tensor:
    """``[B, N, d]`` -> ``dest [B, N]``, by the letter of the spec; ``drop_sources``: ToFu's pruning."""
    batch, n, _ = metric.shape
    out = []
    for b in range(batch):
        tokens = [_unit(metric[b, i].tolist()) for i in range(n)]
        side_a = [i for i in range(n) if i % 2 == 0]
        side_b = [i for i in range(n) if i % 2 == 1]
        best, partner = {}, {}
        for i in side_a:
            if i < protected:
                continue
            for j in side_b:
                if j < protected:
                    continue
                s = _dot(tokens[i], tokens[j])
                if i not in best or s > best[i]:  # strict: the lowest B index wins a tie
                    best[i], partner[i] = s, j
        ranked = sorted(best, key=lambda i: (-best[i], i))  # ties: the lowest A index first
        sources = set(ranked[:r])
        order = list(range(protected))
        order += [i for i in side_a if i >= protected and i not in sources]
        order += [j for j in side_b if j >= protected]
        slot = {tok: s for s, tok in enumerate(order)}
        for i in sources:
            slot[i] = -1 if drop_sources else slot[partner[i]]
        out.append([slot[i] for i in range(n)])
    return torch.tensor(out, dtype=torch.int64)


def merge(x, size, dest, n_out, w=None, mode="mean"):
    """Weighted mean per output slot over its members, sizes summed; ``-1`` dropped.

    ``mode="norm_preserving"`` (ToFu's MLERP): the mean's direction, rescaled to the largest norm
    among the slot's members."""
    batch, n, channels = x.shape
    if size is None:
        size = torch.ones(batch, n, 1, dtype=x.dtype)
    if w is None:
        w = size
    x_out = torch.zeros(batch, n_out, channels, dtype=x.dtype)
    size_out = torch.zeros(batch, n_out, 1, dtype=x.dtype)
    for b in range(batch):
        for s in range(n_out):
            members = [i for i in range(n) if int(dest[b, i]) == s]
            assert members, f"slot {s} of image {b} is empty"
            num = sum(w[b, i, 0] * x[b, i] for i in members)
            den = sum(w[b, i, 0] for i in members)
            mean = num / den
            if mode == "norm_preserving":
                largest = max(float(x[b, i].norm()) for i in members)
                mean = mean / mean.norm() * largest
            x_out[b, s] = mean
            size_out[b, s, 0] = sum(size[b, i, 0] for i in members)
    return x_out, size_out


def compose_source(source, dest):
    """``source[b, o]``: the slot original token ``o`` ends in after this merge."""
    if source is None:
        return dest.clone()
    out = torch.empty_like(source)
    for b in range(source.shape[0]):
        for o in range(source.shape[1]):
            s = int(source[b, o])
            out[b, o] = -1 if s < 0 else int(dest[b, s])
    return out
