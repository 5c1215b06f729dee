"""Constants shared by the kernels.

A ``@triton.jit`` function may read no global but a ``tl.constexpr`` one: the GPU compiler rejects
a plain module-level float ("Cannot access global variable"), while the interpreter accepts it.
"""

from __future__ import annotations

import triton.language as tl

# Cost declarations (``@triton.jit(launch_metadata=...)``, read by tomec.kernels.aot and by Triton's
# profiler) count whole tiles where a loop computes whole tiles, so they count the work executed.

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def padded(n: int, block: int) -> int:
    """``n`` rounded up to whole tiles of ``block``: the lanes a tiled loop really computes."""
    return cdiv(n, block) * block


def log2_ceil(n: int) -> int:
    return max(int(n) - 1, 0).bit_length()


# The smallest normal fp32: the floor of a norm before dividing by it (an all-zero row stays finite).
TINY: tl.constexpr = tl.constexpr(1.1754943508222875e-38)
