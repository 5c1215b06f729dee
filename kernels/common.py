"""Constants shared by the kernels.

A ``@triton.jit`` function may read no global but a ``tl.constexpr`` one: the GPU compiler rejects
a plain module-level float ("Cannot access global variable"), while the interpreter accepts it.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Device:
    """Peak figures of one GPU (per SM where the model divides work over SMs): what the launchers
    size their grids for, and what tomec.bench.kernel_model bounds kernel times with."""

    name: str
    sms: int
    clock_hz: float  # boost clock
    ops_per_sm_clock: float  # CUDA-core operations (an FMA is 2)
    tc_flops: float  # dense 16-bit tensor-core FLOP/s, whole device
    hbm_bytes_per_s: float
    sm_bytes_per_clock: float  # what one SM can load from L2 per clock

    @property
    def sm_ops(self) -> float:
        return self.ops_per_sm_clock * self.clock_hz

    @property
    def sm_tc(self) -> float:
        return self.tc_flops / self.sms

    @property
    def sm_bytes(self) -> float:
        return self.sm_bytes_per_clock * self.clock_hz


# NVIDIA's H200 SXM figures: 132 SMs at 1.98 GHz, 128 FP32 lanes per SM, 989 TFLOP/s dense BF16,
# 4.8 TB/s HBM3e; 64 B per clock per SM from L2.
H200 = Device("NVIDIA H200 (model)", 132, 1.98e9, 256.0, 989.4e12, 4.8e12, 64.0)
