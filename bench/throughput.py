"""Throughput: tomec against the unmerged model and the eager reference patch, eager and compiled.

The measurement is the library's (:mod:`tomec.throughput`, the ``tomec bench`` command); this script
keeps the benchmark's name for it (``tomec.bench.throughput.run``, ``python -m
tomec.bench.throughput``, as ``make gpu`` runs it). Results default to ``bench/results/``.

    python -m tomec.bench.throughput --models deit_small_patch16_224 --methods tome --r 156 --inflect 0
"""

from tomec.cli_args import run_command
from tomec.throughput import (
    DEFAULT_R,
    PROVIDERS,
    RESULTS,
    build_providers,
    main,
    measure,
    peak_memory_mb,
    plot,
    run,
    summary,
)

__all__ = ["DEFAULT_R", "PROVIDERS", "RESULTS", "build_providers", "main", "measure", "peak_memory_mb", "plot",
           "run", "summary"]

if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
