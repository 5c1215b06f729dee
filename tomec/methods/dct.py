"""DCT token truncation (Fourier Transformer, ACL'23): fewer tokens by dropping high frequencies."""

from __future__ import annotations

import functools
from dataclasses import dataclass
import math

import numpy as np
import torch
from torch import Tensor

from tomec.errors import ConfigError

from tomec.ops.common import check_dtype, resolve_impl

from .core import Method, Options, register


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``[n, n]``: row ``f`` is frequency ``f`` (fp64)."""
    f = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(math.pi * (2 * j + 1) * f / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


@functools.lru_cache(maxsize=256)
def _resample(t: int, k: int) -> np.ndarray:
    # forward DCT of length t, keep k coefficients, inverse DCT of length k: one [k, t] matrix
    return dct_matrix(k).T @ dct_matrix(t)[:k]


def dct_truncate(x: Tensor, n_out: int, protected: int = 0, *, impl: str = "torch") -> Tensor:
    """Keep the ``n_out - protected`` lowest frequencies of the non-protected tokens.

    Per channel, the non-protected tokens (in order) are a 1-D signal: orthonormal DCT-II along the
    tokens, the first ``T - r`` coefficients kept, orthonormal inverse DCT of that length. Computed
    in fp32 (fp64 stays fp64); returns ``x``'s dtype. ``[B, N, C] -> [B, n_out, C]``.
    """
    check_dtype(x.dtype, "DCT-truncated tokens")
    resolve_impl(impl, x.device)  # one matmul on every device: cuBLAS / MKL, no custom kernel
    batch, n, _ = x.shape
    t, k = n - protected, n_out - protected
    if not 1 <= k <= t:
        raise ConfigError(f"DCT: cannot keep {k} of {t} tokens ({n} tokens, {protected} protected)")
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    matrix = torch.as_tensor(_resample(t, k), dtype=wide, device=x.device)
    low = (matrix @ x[:, protected:].to(wide)).to(x.dtype)
    return torch.cat([x[:, :protected], low], dim=1)


@dataclass(frozen=True)
class DctOptions(Options):
    """DCT has no options."""

    method = "dct"


def _transform(x: Tensor, r: int, protected: int, *, impl: str = "torch") -> Tensor:
    return dct_truncate(x, x.shape[1] - r, protected, impl=impl)


# After the MLP residual: the transform keeps the lowest token frequencies of the block's output.
register(Method(name="dct", options=DctOptions, transform=_transform, site=lambda options: "block",
                supports_source=False))
