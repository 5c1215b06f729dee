"""Benchmarks and evaluation scripts, shipped as ``tomec.bench`` (each module also runs as a script):
throughput (``tomec bench``), kernel and attention micro-benchmarks, accuracy evaluation
(``tomec eval``), the offline digits study and its fine-tuning runs. Results go to ``bench/results/``
as CSV/JSON and plots.

The scripts import the library; the library never imports them: what a ``tomec`` command runs lives
in ``tomec`` (:mod:`tomec.throughput`, :mod:`tomec.evaluate`, :mod:`tomec.digits`, ...), and the
scripts of the same names here re-export it under the names the README and ``make gpu`` use."""

_MODULES = frozenset({
    "accuracy", "aot", "attention", "digits", "finetune_diffrate", "finetune_dtem", "finetune_fpet",
    "gpu", "inductor_aot", "kernel_model", "kernels", "ltmp_digits", "throughput", "timing",
})


def __getattr__(name: str):
    # ``tomec.bench.throughput.run`` after ``import tomec``, as the README writes it, without
    # importing every benchmark (and its plotting) up front.
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
