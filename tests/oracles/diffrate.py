"""DiffRate's prune-then-merge one token at a time (METHODS.md, DiffRate; the official weighting)."""

from __future__ import annotations

import torch

from .tome import _dot, _unit, attention_row


def diffrate_match(x, q, k, size, r, protected, n_dropped=0, scale=None, prop_attn=True):
    """Returns ``dest [B, N]``, ``w [B, N, 1]`` (all ones) and the sizes to sum ``[B, N, 1]``."""
    batch, n, _ = x.shape
    heads, d = q.shape[1], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    t = n - protected
    n_keep, n_src = t - r, r - n_dropped
    dests, sizes = [], []
    for b in range(batch):
        importance = [0.0] * n
        for h in range(heads):
            row = attention_row(q, k, size, b, h, 0, scale, prop_attn)  # the class token's attention
            for j in range(n):
                importance[j] += row[j] / heads
        order = sorted(range(protected, n), key=lambda i: (-importance[i], i))
        keep, src = order[:n_keep], order[n_keep : n_keep + n_src]
        dest = list(range(protected)) + [-1] * t
        scaled = [1.0 if size is None else float(size[b, i, 0]) for i in range(n)]
        for s, i in enumerate(keep):
            dest[i] = protected + s
        unit = {i: _unit(x[b, i].tolist()) for i in keep + src}
        for i in src:
            best, where = None, None
            for s, j in enumerate(keep):  # the first (most important) wins a tie
                c = _dot(unit[i], unit[j])
                if best is None or c > best:
                    best, where = c, s
            dest[i] = protected + where
            scaled[i] = scaled[i] * max(best, 0.0)  # the evaluation path: no clamp at 1
        dests.append(dest)
        sizes.append(scaled)
    dest = torch.tensor(dests, dtype=torch.int64)
    return dest, torch.ones(batch, n, 1, dtype=x.dtype), torch.tensor(sizes, dtype=x.dtype)[..., None]
