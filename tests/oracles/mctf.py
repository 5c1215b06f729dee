"""MCTF's attention received and bidirectional multi-criteria matching, one token at a time
(METHODS.md, MCTF; the second direction, its scores and the output order as mlvlab/MCTF)."""

from __future__ import annotations

from .tome import _dot, _unit, attention_row


def attention_received(q, k, size=None, scale=None, prop_attn=True):
    """``[B, N]`` list of lists: mean over heads and queries of ``softmax(q·k·scale + log size)``."""
    batch, heads, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = []
    for b in range(batch):
        recv = [0.0] * n
        for h in range(heads):
            for i in range(n):
                row = attention_row(q, k, size, b, h, i, scale, prop_attn)
                for j in range(n):
                    recv[j] += row[j] / (heads * n)
        out.append(recv)
    return out


def mctf_match(x, q, k, size, r, protected, tau_sim, tau_info, tau_size, bidirectional,
               scale=None, prop_attn=True):
    """``dest [B, N]`` as a list of lists, and the attention received (for the weights)."""
    batch, n, _ = x.shape
    recv_all = attention_received(q, k, size, scale, prop_attn)
    if r == 0:
        return [list(range(n)) for _ in range(batch)], recv_all
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    dests = []
    for b in range(batch):
        recv = recv_all[b]
        sizes = [1.0 if size is None else float(size[b, i, 0]) for i in range(n)]
        info = [1.0 / v for v in recv]
        info = [v / max(info) for v in info]
        small = [1.0 / s for s in sizes]
        small = [v / max(small) for v in small]
        unit = [_unit(x[b, i].tolist()) for i in range(n)]

        def score(i, j):
            s = 1.0
            if tau_sim:
                s *= max((_dot(unit[i], unit[j]) + 1) / 2, 0.0) ** (1 / tau_sim)
            if tau_info:
                s *= (info[i] * info[j]) ** (1 / tau_info)
            if tau_size and size is not None:
                s *= (small[i] * small[j]) ** (1 / tau_size)
            return s

        side_a = [i for i in range(protected, n) if i % 2 == 0]
        side_b = [j for j in range(protected, n) if j % 2 == 1]
        best, partner = {}, {}
        for i in side_a:
            for j in side_b:
                s = score(i, j)
                if i not in best or s > best[i]:  # strict: the lowest B index wins a tie
                    best[i], partner[i] = s, j
        sources = sorted(side_a, key=lambda i: (-best[i], i))[:r1]
        left_a = [i for i in side_a if i not in sources]
        best2, partner2 = {}, {}
        for j in side_b:
            for i in left_a:  # by position: the lowest A position wins a tie
                s = score(i, j)
                if j not in best2 or s > best2[j]:
                    best2[j], partner2[j] = s, i
        if bidirectional:
            ranked_b = sorted(side_b, key=lambda j: (-best2[j], j))
            sources2, left_b = ranked_b[:r2], ranked_b[r2:]
        else:
            sources2, left_b = [], side_b
        order = list(range(protected)) + left_a + left_b
        slot = {tok: s for s, tok in enumerate(order)}
        for j in sources2:
            slot[j] = slot[partner2[j]]
        for i in sources:
            slot[i] = slot[partner[i]]  # after direction 2: the group moves with its B token
        dests.append([slot[i] for i in range(n)])
    return dests, recv_all
