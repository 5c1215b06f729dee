"""Inputs the matching kernels' tests share: small integers and 0/1 keys, so every score is exact in
both implementations and ties are plentiful (the maps must be equal)."""

from __future__ import annotations

import torch


def integer_metric(batch, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (batch, n, d), generator=g).to(dtype)


def match_rs(n, protected):
    cap = (n - protected) // 2
    return sorted({0, 1, cap // 2, cap})


def binary_keys(batch, n, d, seed):
    """0/1 keys with four ones of 16: exact cosines, and with margin 0 exact energies (ties)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.zeros(batch, 1, n, d)
    for b in range(batch):
        for i in range(n):
            keys[b, 0, i, torch.randperm(16, generator=g)[:4]] = 1.0
    return keys
