"""Timers shared by the benchmark scripts: medians with the 20th/80th percentiles, in milliseconds."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_cuda(fn: Callable[[], object]) -> tuple[float, float, float]:
    """``triton.testing.do_bench`` median, p20, p80 (ms) of ``fn`` on the current CUDA device."""
    from triton.testing import do_bench

    q = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=50, rep=200)
    return q[0], q[1], q[2]


def time_cpu(fn: Callable[[], object], reps: int = 20) -> tuple[float, float, float]:
    """``time.perf_counter`` median, p20, p80 (ms) after three warm-up calls."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - start) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[len(ts) // 5], ts[(4 * len(ts)) // 5]
