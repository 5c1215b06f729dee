"""Benchmarks and evaluation, shipped as ``tomec.bench`` (each module also runs as a script):
throughput (``tomec bench``), kernel and attention micro-benchmarks, accuracy evaluation
(``tomec eval``), the offline digits study. Results go to ``bench/results/`` as CSV/JSON and plots."""
