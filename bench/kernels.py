"""Kernel micro-benchmarks: the merge step (metric, matching, merge) per provider and shape.

Providers, measured in one process: ``eager`` (the plain-PyTorch ops), ``inductor`` (the same ops
under ``torch.compile``) and ``triton`` (tomec's kernels). Per-kernel rows (matching alone, merge
alone) and the whole step. On CUDA, times are ``triton.testing.do_bench`` medians (with the 20th and
80th percentiles) and the achieved bandwidth is compared with the device's measured copy bandwidth;
on CPU (``--device cpu``, for checking the script) ``time.perf_counter`` medians, eager vs Inductor.

    python bench/kernels.py                      # GPU: DeiT-S / ViT-B / ViT-L, batch 1/32/256
    python bench/kernels.py --device cpu --quick

Writes ``bench/results/kernels-<device>.csv`` and ``.json`` (with machine, torch, Triton, GPU).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from tomec.bench.timing import time_cpu, time_cuda
from tomec import kernels, ops

from tomec.machine import device_name, machine

# name: (tokens, width, heads); r: tokens one ToMe layer removes at r=13-per-layer settings
MODELS = {"deit_s": (197, 384, 6), "vit_b": (197, 768, 12), "vit_l": (197, 1024, 16)}
R = 13


def step_fn(impl: str, r: int, protected: int) -> Callable:
    def step(k: torch.Tensor, x: torch.Tensor):
        dest = ops.bipartite_match(k, r, protected, impl=impl)
        return ops.merge(x, None, dest, x.shape[1] - r, impl=impl)

    return step


def match_fn(impl: str, r: int, protected: int) -> Callable:
    return lambda k, x: ops.bipartite_match(k, r, protected, impl=impl)


def merge_fn(impl: str, dest: torch.Tensor, r: int) -> Callable:
    return lambda k, x: ops.merge(x, None, dest, x.shape[1] - r, impl=impl)


def copy_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy (read + write)."""
    n = 256 * 1024 * 1024 // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src))[0] if device == "cuda" else time_cpu(lambda: dst.copy_(src))[0]
    return 2 * src.numel() * src.element_size() / ms / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="CPU check: small batches, fp32")
    parser.add_argument("--providers", default="eager,inductor,triton",
                        help="of eager, inductor, triton (triton only on CUDA)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    device = args.device
    if args.quick:
        args.batches, args.dtypes, args.models = "1,8", "float32", "deit_s"
    providers = [p for p in args.providers.split(",") if p != "triton"]
    if "triton" in args.providers.split(","):
        if device == "cuda" and kernels.unavailable_reason() is None:
            providers.append("triton")
        else:
            print(f"triton provider skipped: {kernels.unavailable_reason() or 'needs a CUDA device'}")
    timer = time_cuda if device == "cuda" else time_cpu
    bandwidth = copy_bandwidth(device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    print(f"device {device_name(device)}: copy bandwidth {bandwidth:.0f} GB/s")

    cases = [
        (m, b, getattr(torch, dt))
        for m in args.models.split(",")
        for b in map(int, args.batches.split(","))
        for dt in args.dtypes.split(",")
    ]
    rows = []
    for model, batch, dtype in tqdm(cases, desc="shapes"):
        n, width, heads = MODELS[model]
        k = torch.randn(batch, heads, n, width // heads, device=device, dtype=dtype)
        x = torch.randn(batch, n, width, device=device, dtype=dtype)
        dest = ops.bipartite_match(k, R, 1)
        moved = (k.numel() + x.numel() + batch * (n - R) * (width + 1)) * x.element_size()
        for kernel, make in (
            ("step", lambda impl: step_fn(impl, R, 1)),
            ("match", lambda impl: match_fn(impl, R, 1)),
            ("merge", lambda impl: merge_fn(impl, dest, R)),
        ):
            for provider in providers:
                fn = make("triton" if provider == "triton" else "torch")
                if provider == "inductor":
                    torch._dynamo.reset()
                    fn = torch.compile(fn, fullgraph=True)
                run = lambda fn=fn: fn(k, x)  # noqa: E731
                med, lo, hi = timer(run)
                rows.append(
                    dict(model=model, tokens=n, width=width, batch=batch, dtype=str(dtype)[6:],
                         kernel=kernel, provider=provider, ms=med, ms_p20=lo, ms_p80=hi,
                         gb_per_s=moved / med / 1e6 if kernel == "step" else None,
                         copy_share=moved / med / 1e6 / bandwidth if kernel == "step" else None)
                )
    for row in rows:  # speedups within each (shape, kernel)
        same = [o for o in rows if all(o[f] == row[f] for f in ("model", "batch", "dtype", "kernel"))]
        base = {o["provider"]: o["ms"] for o in same}
        for other in ("eager", "inductor"):
            row[f"speedup_vs_{other}"] = base[other] / row["ms"] if other in base else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = (gpu or "cpu").replace(" ", "-")
    meta = dict(machine(device), copy_gb_per_s=bandwidth)
    with open(out / f"kernels-{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"kernels-{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    for row in rows:
        if row["kernel"] == "step":
            share = f"{row['copy_share']:.0%}" if row["copy_share"] is not None else ""
            ratios = "  ".join(f"x{row[f'speedup_vs_{o}']:.2f} {o}" for o in ("eager", "inductor")
                               if row[f"speedup_vs_{o}"] is not None)
            print(f"{row['model']:7} b={row['batch']:<4} {row['dtype']:9} {row['provider']:9} "
                  f"{row['ms']:8.3f} ms  {ratios}  {share} of copy bandwidth")
    print(f"wrote {out / f'kernels-{tag}.csv'}")


if __name__ == "__main__":
    main()
