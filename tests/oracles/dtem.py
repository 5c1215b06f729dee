"""Loop oracle for DTEM's soft merging (training), written from the description, element by element."""

from __future__ import annotations

import math

import torch

EPS = float(torch.finfo(torch.float32).eps)


def relaxed_topk(scores, r, k2, tau1, tau2):
    """One batch element: scores [n_a][n_b] (nested lists of floats) -> assignment [n_a][n_b]."""
    n_a, n_b = len(scores), len(scores[0]) if scores else 0
    k2 = min(k2, n_b)
    cand = []  # per A row: its k2 best B columns, ties to the lower index
    for i in range(n_a):
        cols = sorted(range(n_b), key=lambda j: (-scores[i][j], j))[:k2]
        cand.append(cols)
    logit = [[scores[i][j] / tau1 for j in cand[i]] for i in range(n_a)]
    khot = [[0.0] * k2 for _ in range(n_a)]
    for _ in range(r):
        top = max(v / tau2 for row in logit for v in row)
        e = [[math.exp(v / tau2 - top) for v in row] for row in logit]
        z = sum(sum(row) for row in e)
        for i in range(n_a):
            p_row = [v / z for v in e[i]]
            for c in range(k2):
                khot[i][c] += p_row[c]
            drop = math.log(max(1 - sum(p_row), EPS))
            logit[i] = [v + drop for v in logit[i]]
    out = [[0.0] * n_b for _ in range(n_a)]
    for i in range(n_a):
        total = sum(khot[i])
        scale = max(total - 1, 0.0) + 1
        for c, j in enumerate(cand[i]):
            out[i][j] += khot[i][c] / scale
    return out


def soft_merge(x, size, metric, r, n, protected, k2, tau1, tau2, split=None):
    """x [B, N, C], size [B, N, 1], metric [B, N, d] (fp64 tensors) -> (x, size, n - r), by loops;
    ``split[b]`` lists the taking-part tokens (0 = the first after the protected ones) whose even
    positions form A and odd positions B (default: in sequence order)."""
    r = min(r, max(n - protected, 0) // 2)
    if r <= 0:
        return x.clone(), size.clone(), n
    xs, ss = [], []
    for b in range(x.shape[0]):
        seq = list(range(n - protected)) if split is None else [int(v) for v in split[b]]
        a_idx = [protected + seq[k] for k in range(0, len(seq), 2)]
        b_idx = [protected + seq[k] for k in range(1, len(seq), 2)]
        unit = [metric[b, i] / metric[b, i].norm() for i in range(x.shape[1])]
        scores = [[float(unit[i] @ unit[j]) for j in b_idx] for i in a_idx]
        assign = relaxed_topk(scores, r, k2, tau1, tau2)
        tokens, weights = [], []
        for ia, i in enumerate(a_idx):  # A tokens keep their value, lose the assigned share of size
            weights.append(float(size[b, i, 0]) * min(max(1 - sum(assign[ia]), 0.0), 1.0))
            tokens.append(x[b, i])
        for jb, j in enumerate(b_idx):  # B tokens absorb their share, size-weighted
            w = float(size[b, j, 0])
            total = x[b, j] * w
            for ia, i in enumerate(a_idx):
                total = total + x[b, i] * (assign[ia][jb] * float(size[b, i, 0]))
                w += assign[ia][jb] * float(size[b, i, 0])
            weights.append(w)
            tokens.append(total / w)
        order = sorted(range(len(weights)), key=lambda t: (-weights[t], t))
        rows = [x[b, i] for i in range(protected)] + [tokens[t] for t in order]
        rows += [x[b, i] for i in range(n, x.shape[1])]
        sz = [float(size[b, i, 0]) for i in range(protected)] + [weights[t] for t in order]
        sz += [float(size[b, i, 0]) for i in range(n, x.shape[1])]
        xs.append(torch.stack(rows))
        ss.append(torch.tensor(sz, dtype=x.dtype).unsqueeze(-1))
    return torch.stack(xs), torch.stack(ss), n - r
