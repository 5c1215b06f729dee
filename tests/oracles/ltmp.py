"""LTMP's merge-then-prune, one token at a time (tomec/ops/ltmp.py's docstring; Mxbonn/ltmp)."""

from __future__ import annotations

import math

import torch

from .mctf import attention_received
from .tome import _dot, _unit
from .tome import bipartite_match as tome_bipartite


importance = attention_received  # the same quantity: mean attention each token receives


def ltmp_match(keys, q, size, n_merge, n_prune, protected, scale=None, prop_attn=True, imp=None):
    """``dest [B, N]``: ToMe's merge of ``n_merge``; then the ``n_prune`` least important tokens
    that are neither protected nor part of a merge are dropped (ties: the higher index first)."""
    metric = keys.sum(1) if keys.dim() == 4 else keys
    if n_merge + n_prune == 0:  # still rebuilt as A then B (protected first), as every block
        n = metric.shape[1]
        order = list(range(protected)) + [i for i in range(protected, n) if i % 2 == 0] + [
            i for i in range(protected, n) if i % 2 == 1
        ]
        dest = [order.index(i) for i in range(n)]
        return torch.tensor([dest] * metric.shape[0], dtype=torch.int64)
    merged = tome_bipartite(metric, n_merge, protected)
    if n_prune == 0:
        return merged
    batch, n = merged.shape
    if imp is None:
        imp = importance(q, keys, size, scale, prop_attn)
    out = []
    for b in range(batch):
        row = [int(v) for v in merged[b]]
        members = {}
        for i, s in enumerate(row):
            members.setdefault(s, []).append(i)
        candidates = [i for i in range(protected, n) if len(members[row[i]]) == 1]
        # least important first; among equals the higher index first
        candidates.sort(key=lambda i: (float(imp[b][i]), -i))
        pruned = set(candidates[:n_prune])
        gone = {row[i] for i in pruned}
        kept = sorted(set(row) - gone)
        renumber = {s: new for new, s in enumerate(kept)}
        out.append([-1 if i in pruned else renumber[row[i]] for i in range(n)])
    return torch.tensor(out, dtype=torch.int64)


def threshold_counts(keys, q, size, protected, merge_threshold, prune_threshold, scale=None,
                     prop_attn=True):
    """Per image ``(n_merge, n_prune)`` the thresholds pick, by the letter of the rule."""
    metric = keys.sum(1) if keys.dim() == 4 else keys
    batch, n, _ = metric.shape
    imp = importance(q, keys, size, scale, prop_attn)
    out = []
    for b in range(batch):
        tokens = [_unit(metric[b, i].tolist()) for i in range(n)]
        best = {}
        for i in range(protected, n, 1):
            if i % 2:
                continue
            for j in range(1, n, 2):
                if j < protected:
                    continue
                s = _dot(tokens[i], tokens[j])
                best[i] = max(best.get(i, -math.inf), s)
        m = min(sum(1 for v in best.values() if v > merge_threshold), (n - protected) // 2)
        dest = tome_bipartite(metric[b : b + 1], m, protected)[0].tolist()
        count = {}
        for s in dest:
            count[s] = count.get(s, 0) + 1
        low = sum(
            1 for i in range(protected, n) if count[dest[i]] == 1 and imp[b][i] <= prune_threshold
        )
        cap = n - protected - 2 * m
        if protected == 0:
            cap = min(cap, n - m - 1)
        out.append((m, min(low, max(cap, 0))))
    return out
