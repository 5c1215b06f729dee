"""DCT truncation by the textbook sums (METHODS.md, DCT)."""

from __future__ import annotations

import math

import torch


def _alpha(f: int, n: int) -> float:
    return math.sqrt(1.0 / n) if f == 0 else math.sqrt(2.0 / n)


def dct_truncate(x: torch.Tensor, n_out: int, protected: int) -> torch.Tensor:
    """Per channel: orthonormal DCT-II of the non-protected tokens, keep the first ``k``
    coefficients, orthonormal inverse DCT (DCT-III) of length ``k``."""
    batch, n, channels = x.shape
    t, k = n - protected, n_out - protected
    signal = x[:, protected:].double()
    coeff = torch.zeros(batch, k, channels, dtype=torch.float64)
    for f in range(k):
        for j in range(t):
            coeff[:, f] += _alpha(f, t) * math.cos(math.pi * (2 * j + 1) * f / (2 * t)) * signal[:, j]
    low = torch.zeros(batch, k, channels, dtype=torch.float64)
    for m in range(k):
        for f in range(k):
            low[:, m] += _alpha(f, k) * math.cos(math.pi * (2 * m + 1) * f / (2 * k)) * coeff[:, f]
    return torch.cat([x[:, :protected].double(), low], dim=1)
