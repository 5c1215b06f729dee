"""Benchmarks and evaluation, shipped as ``tomec.bench`` (each module also runs as a script):
throughput (``tomec bench``), kernel and attention micro-benchmarks, accuracy evaluation
(``tomec eval``), the offline digits study. Results go to ``bench/results/`` as CSV/JSON and plots."""

_MODULES = frozenset({
    "accuracy", "aot", "attention", "digits", "finetune_diffrate", "finetune_dtem", "finetune_fpet",
    "gpu", "inductor_aot", "kernel_model", "kernels", "ltmp_digits", "machine", "throughput", "timing",
})


def __getattr__(name: str):
    # ``tomec.bench.throughput.run`` after ``import tomec``, as the README writes it, without
    # importing every benchmark (and its plotting) up front.
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
