"""Throughput: tomec against the unmerged model and the eager reference patch, eager and compiled.

For every model × method × r × batch × dtype, five providers are built in one process: ``eager`` (the
unmerged model), ``inductor`` (the unmerged model under ``torch.compile``), ``reference`` (the eager
reference patch), ``reference_inductor`` (that patch under ``torch.compile``) and ``tomec``
(``torch.compile(model, backend=tomec.backend(...))``). Compile time is the first call, reported
apart; steady state is measured in interleaved rounds (every provider once per round), as medians
with the 20th-80th percentile spread. CPU timing uses ``time.perf_counter`` with the thread count
fixed and printed; CUDA timing uses CUDA events.

Per row: images/s, speedups over each baseline, MACs per image from the resolved schedule, the
ideal speedup (MAC ratio), the share of it reached over the unmerged Inductor model, peak memory
(CUDA: allocator peak; CPU: rise of the resident high-water mark during one call). Results go to
``throughput-<device>.csv`` / ``.json`` with the machine, torch, Triton and GPU names, and a figure
of speedup against r per method with the ideal line, in ``--out`` (default :data:`RESULTS`: the
repository's ``bench/results/`` from a source checkout, the working directory otherwise).

    tomec bench --models deit_small_patch16_224 --methods tome --r 156 --inflect 0 --batch 16
    tomec bench --models deit_small_patch16_224 --method pitome --keep-ratio 0.925 --batch 16

The merge arguments are the other subcommands' (``--schedule``, ``--keep-ratio``, ``--preset``,
``--option``, ``--inflect``), except that ``--method``/``--methods`` and ``--r``/``--reduce`` take
comma-separated lists to sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import ctypes
import ctypes.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from . import reference
from .api import TomecBackend, backend
from .cli_args import add_debug_argument, add_sweep_arguments, merge_sweep, parse_integers, run_command
from .errors import ConfigError
from .flops import flops_report
from .machine import RESULTS, device_name, machine

__all__ = [
    "PROVIDERS", "RESULTS", "DEFAULT_R", "peak_memory_mb", "build_providers", "measure", "plot", "run", "summary",
    "main",
]

PROVIDERS = ("eager", "inductor", "reference", "reference_inductor", "tomec")


def _timer(device: str) -> Callable[[Callable[[], Any]], float]:
    if device == "cuda":
        def run(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn: Callable[[], Any]) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return run


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _return_freed_memory() -> None:
    """glibc: serve blocks over 64 KiB by mmap and unmap them on free (no caching in the heap)."""

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixed: no dynamic raising)
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], Any], device: str) -> Optional[float]:
    """Memory one call needs above what was held before it.

    CUDA: the allocator's peak. CPU: the rise of the process's resident high-water mark (``VmHWM``,
    reset through ``/proc/self/clear_refs``), with glibc told to hand large blocks back to the system
    on free, so that the resident size follows what is live (None where ``/proc`` is missing).
    Call it after timing: the allocator setting slows large allocations a little.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _return_freed_memory()
    fn()
    before = _proc_status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    fn()
    peak = _proc_status_kb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) / 1024


def build_providers(
    model: torch.nn.Module, method: str, r: Optional[int], providers: Sequence[str], mode: Optional[str] = None,
    **options: Any,
) -> tuple[dict[str, Callable], dict[str, TomecBackend]]:
    """Callables for each provider (compiled lazily by torch.compile on their first call, with
    ``mode=`` for every compiled one, e.g. ``"reduce-overhead"``: CUDA graphs). ``r`` and
    ``options`` (``inflect=``, ``schedule=``, method options, backend settings) go to every merged
    provider alike; ``r=None`` with ``schedule=``."""
    built, backends = {}, {}
    for name in providers:
        if name == "eager":
            built[name] = model
        elif name == "inductor":
            built[name] = torch.compile(copy.deepcopy(model), fullgraph=True, mode=mode)
        elif name == "reference":
            built[name] = reference.patch(copy.deepcopy(model), method, r=r, **options)
        elif name == "reference_inductor":
            patched = reference.patch(copy.deepcopy(model), method, r=r, **options)
            built[name] = torch.compile(patched, fullgraph=True, mode=mode)
        elif name == "tomec":
            backends[name] = backend(method=method, r=r, **options)
            built[name] = torch.compile(copy.deepcopy(model), backend=backends[name], fullgraph=True,
                                        mode=mode)
        else:
            raise ConfigError(f"unknown provider {name!r}; known: {PROVIDERS}")
    return built, backends


def measure(
    model_name: str, method: str, r: Optional[int], batch: int, dtype: torch.dtype, device: str,
    rounds: int = 5, reps: int = 2, inflect: float = -0.5, providers: Sequence[str] = PROVIDERS,
    mode: Optional[str] = None, **options: Any,
) -> list[dict[str, Any]]:
    """One row per provider for one configuration (see the module docstring). ``r=None``: the
    schedule comes from ``options`` (``schedule=``, or a method option that sets it); the rows' ``r``
    is then the resolved schedule's total."""
    import timm  # seconds to import: paid by a measurement only

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval().to(device, dtype)
    side = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
    macs = flops_report(model, method=method, r=r, inflect=inflect, **options)
    fns, _ = build_providers(model, method, r, providers, mode, inflect=inflect, **options)
    timer = _timer(device)
    compile_s, times, memory = {}, {name: [] for name in fns}, {}
    steps = tqdm(total=len(fns) * 2 + rounds, desc=f"{model_name} {method} r={r} b={batch}", leave=False)
    with torch.inference_mode():
        for name, fn in fns.items():
            steps.set_postfix_str(f"compiling {name}")
            compile_s[name] = timer(lambda: fn(x))
            fn(x)  # warm
            steps.update()
        for i in range(rounds):
            steps.set_postfix_str(f"round {i + 1}/{rounds}")
            for name, fn in fns.items():
                times[name].append(timer(lambda: [fn(x) for _ in range(reps)]) / reps)
            steps.update()
        for name, fn in fns.items():  # after timing: the CPU measure changes allocator settings
            steps.set_postfix_str(f"memory {name}")
            memory[name] = peak_memory_mb(lambda: fn(x), device)
            steps.update()
    steps.close()
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, ts in times.items():
        ts = sorted(ts)
        row = {
            "model": model_name, "method": method, "r": sum(macs["schedule"]) if r is None else r,
            "inflect": inflect, "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "device": device, "provider": name,
            "mode": mode or "default",
            "images_per_s": batch / medians[name],
            "images_per_s_p20": batch / ts[(4 * len(ts)) // 5],
            "images_per_s_p80": batch / ts[len(ts) // 5],
            "ms_per_batch": medians[name] * 1e3, "compile_s": compile_s[name],
            "gmacs_per_image": (macs["unmerged_macs"] if name in ("eager", "inductor") else macs["macs"]) / 1e9,
            "ideal_speedup": macs["ideal_speedup"], "peak_memory_mb": memory[name],
            "schedule": json.dumps(macs["schedule"]),
        }
        for base in fns:
            row[f"speedup_vs_{base}"] = medians[base] / medians[name]
        merged = name not in ("eager", "inductor")
        if "inductor" in medians and merged:
            row["share_of_ideal"] = medians["inductor"] / medians[name] / macs["ideal_speedup"]
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Speedup over the unmerged Inductor model against r, one line per method, with the ideal."""
    import matplotlib  # seconds to import, and optional on a bare GPU machine (run() goes on without it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["batch"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (model, batch, dtype) in zip(axes[0], groups):
        mine = [r for r in rows if (r["model"], r["batch"], r["dtype"]) == (model, batch, dtype)]
        for method in sorted({r["method"] for r in mine}):
            pts = sorted((r["r"], r["speedup_vs_inductor"], r["ideal_speedup"]) for r in mine
                         if r["method"] == method and r["provider"] == "tomec" and "speedup_vs_inductor" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"tomec {method}")
                ax.plot([p[0] for p in pts], [p[2] for p in pts], "kx--", alpha=0.5,
                        label="ideal (FLOP ratio)" if method == min(r["method"] for r in mine) else None)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(title=f"{model} b={batch} {dtype}", xlabel="r (tokens removed)",
               ylabel="speedup over unmerged Inductor (dashed: ideal)")
        if ax.get_legend_handles_labels()[0]:  # no tomec rows (--providers without it): no legend
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextlib.contextmanager
def _inductor_cache(fresh: bool) -> Iterator[None]:
    """An empty Inductor cache for the duration (removed after), or the one in use."""
    if not fresh:
        yield
        return
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="tomec-bench-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def run(
    models: Sequence[str], methods: Sequence[str], rs: Sequence[Optional[int]], batches: Sequence[int],
    dtypes: Sequence[str] = ("float32",), device: str = "cpu", rounds: int = 5, reps: int = 2,
    inflect: float = -0.5, threads: Optional[int] = None, providers: Sequence[str] = PROVIDERS,
    out: Path = RESULTS, tag: Optional[str] = None, fresh_cache: bool = True, mode: Optional[str] = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Measure every combination; write CSV, JSON and the figure; return the rows. ``options``: method
    options, backend settings and ``schedule=`` (with ``rs=[None]``) passed to every merged provider. ``fresh_cache``: compile into an
    empty Inductor cache, so compile times are cold (as a user's first run)."""
    if threads:
        torch.set_num_threads(threads)
    print(f"tomec bench on {device_name(device)}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows: list[dict[str, Any]] = []
    cases = [(m, meth, r, b, dt) for m in models for meth in methods for r in rs for b in batches for dt in dtypes]
    with _inductor_cache(fresh_cache):
        for model, method, r, batch, dtype in tqdm(cases, desc="bench"):
            rows += measure(model, method, r, batch, getattr(torch, dtype), device, rounds, reps, inflect,
                            providers, mode, **options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"throughput-{tag or device}"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    meta = {**machine(device), "mode": mode, "inductor_cache": "fresh" if fresh_cache else "as found", "options": options}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    try:
        plot(rows, stem.with_suffix(".png"))
    except ImportError as e:  # matplotlib is optional where only numbers are wanted (a bare GPU box)
        print(f"no figure: {e}")
    print(summary(rows))
    print(f"wrote {stem}.csv / .json / .png")
    return rows


def _ratio(row: dict[str, Any], base: str, width: int) -> str:
    value = row.get(f"speedup_vs_{base}")
    return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"


def summary(rows: list[dict[str, Any]]) -> str:
    """A table: images/s per provider, tomec's speedups and share of the ideal."""
    lines = [f"{'model':26}{'method':9}{'r':>4}{'batch':>6} {'provider':19}{'img/s':>9}{'compile s':>10}"
             f"{'x inductor':>11}{'x ref+ind':>10}{'ideal':>7}{'share':>7}"]
    for row in rows:
        lines.append(
            f"{row['model']:26}{row['method']:9}{row['r']:>4}{row['batch']:>6} {row['provider']:19}"
            f"{row['images_per_s']:9.1f}{row['compile_s']:10.1f}{_ratio(row, 'inductor', 11)}"
            f"{_ratio(row, 'reference_inductor', 10)}{row['ideal_speedup']:7.2f}"
            + (f"{row['share_of_ideal']:7.0%}" if "share_of_ideal" in row else "")
        )
    return "\n".join(lines)


DEFAULT_R = 156


def main(argv: Optional[list[str]] = None) -> None:
    """``tomec bench``: the command line of :func:`run`."""
    parser = argparse.ArgumentParser(prog="tomec bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated timm names (default: deit_small_patch16_224, or the preset's)")
    add_sweep_arguments(parser)  # --method(s), --r/--reduce (lists), --inflect, --schedule, --keep-ratio, ...
    parser.add_argument("--batch", default="16")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default=None, help="file name tag (default: the device)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="reuse the Inductor cache (default: a fresh one, so compile times are cold)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    methods, rs, kwargs = merge_sweep(args, DEFAULT_R)  # fills args.models from a preset
    inflect = kwargs.pop("inflect")
    split = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    providers = split(args.providers)
    for name in providers:
        if name not in PROVIDERS:
            raise ConfigError(f"--providers: unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
    if args.rounds < 1 or args.reps < 1:
        raise ConfigError(f"--rounds and --reps must be at least 1, got {args.rounds} and {args.reps}")
    run(split(args.models), methods, rs, parse_integers(args.batch, "--batch"), split(args.dtype), args.device,
        args.rounds, args.reps, inflect, args.threads, providers, Path(args.out), args.tag,
        fresh_cache=not args.warm_cache, mode=args.mode, **kwargs)


if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
