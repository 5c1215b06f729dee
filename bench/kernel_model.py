"""A lower bound on every kernel's time on an H200, beside the time of the layer it serves.

Without a GPU, each kernel's time is bounded from its own cost declaration (``launch_metadata``:
CUDA-core operations, tensor-core FLOPs, distinct global bytes, all bytes loaded), its grid, and the
device's per-SM and total throughput (README, "The kernel performance model"):

    t = max(flops / (f_sm · S), tc_flops / (t_sm · S), bytes / B_hbm, loads / (b_sm · S)),
    S = min(SMs, programs)

so a kernel whose grid leaves SMs idle is charged for it. The layer it serves (a ViT block at the
same batch and token count, bf16) is bounded the same way from its GEMM FLOPs and the bytes of its
weights and activations. When a GPU is lent, ``bench/kernels.py`` measures the same rows and
``measured_us`` replaces the model's figure there.

    python -m tomec.bench.kernel_model          # writes bench/results/kernels-model.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from tomec import methods
from tomec.bench.aot import MODELS, Shape, kernel_methods, step_calls, step_launches
from tomec.machine import machine
from tomec.kernels.common import H200, Device

RESULTS = Path(__file__).resolve().parent / "results"



# The shapes the acceptance rule reads (ViT-B at 224 px, ViT-L at 384 px) and DeiT-S for reference.
CASES = (("deit_s", 197), ("vit_b", 197), ("vit_l", 577))
BATCHES = (1, 256)
SHARE_LIMIT = 0.05  # of the layer's time, at batch 1, for ViT-B and ViT-L


def launch_time(cost: dict[str, float], programs: int, device: Device = H200) -> float:
    """Seconds: the model's lower bound for one launch."""
    s = min(device.sms, max(programs, 1))
    return max(
        cost["flops"] / (device.sm_ops * s),
        cost["tc_flops"] / (device.sm_tc * s),
        cost["bytes"] / device.hbm_bytes_per_s,
        cost["loads"] / (device.sm_bytes * s),
    )


def layer_time(width: int, tokens: int, batch: int, device: Device = H200, element: int = 2) -> float:
    """Seconds: the lower bound of one ViT block (MLP ratio 4) at ``tokens`` tokens, 16-bit."""
    tc = 2 * batch * (12 * tokens * width ** 2 + 2 * tokens ** 2 * width)
    # weights once; activations: the ten ops of a block read 20 and write 18 token-sized tensors
    moved = 12 * width ** 2 * element + 38 * batch * tokens * width * element
    return max(tc / device.tc_flops, moved / device.hbm_bytes_per_s)


@dataclass
class Row:
    model: str
    tokens: int
    batch: int
    method: str
    kernel: str
    grid: list[int]
    programs: int
    flops: float
    tc_flops: float
    bytes: float
    loads: float
    model_us: float
    layer_us: float
    share: float
    measured_us: Optional[float] = None
    notes: list[str] = field(default_factory=list)


def rows(cases: Sequence[tuple[str, int]] = CASES, batches: Sequence[int] = BATCHES,
         dtype: torch.dtype = torch.bfloat16, device: Device = H200,
         method_names: Optional[Sequence[str]] = None) -> list[Row]:
    """One row per kernel launch of every method's block step (its later block: sizes threaded)."""
    out = []
    for model, tokens in cases:
        width, heads = MODELS[model]
        for batch in batches:
            layer = layer_time(width, tokens, batch, device)
            shape = Shape(model, width, heads, tokens, batch, dtype)
            for method in method_names or kernel_methods():
                # the later block's step (sizes and source map threaded): the network's steady state
                for launch in step_launches(method, shape)[-1]:
                    cost = launch.cost()
                    t = launch_time(cost, launch.programs, device)
                    out.append(Row(model, tokens, batch, method, launch.name, list(launch.grid),
                                   launch.programs, cost["flops"], cost["tc_flops"], cost["bytes"],
                                   cost["loads"], t * 1e6, layer * 1e6, t / layer))
    return out


def measure(table: Sequence[Row], dtype: torch.dtype = torch.bfloat16, iters: int = 20) -> None:
    """Fill ``measured_us`` from the GPU: each method's block step runs on random inputs of the
    row's shape under ``torch.profiler``; a kernel's time is its mean device time per launch."""
    from torch.profiler import ProfilerActivity, profile

    groups: dict[tuple, list[Row]] = {}
    for row in table:
        groups.setdefault((row.model, row.tokens, row.batch, row.method), []).append(row)
    for (model, tokens, batch, method), members in groups.items():
        width, heads = MODELS[model]
        args, kwargs = step_calls(method, Shape(model, width, heads, tokens, batch, dtype), "cuda")[-1]
        for _ in range(3):
            methods.merge_step(*args, **kwargs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                methods.merge_step(*args, **kwargs)
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for event in prof.key_averages():
            us = getattr(event, "device_time_total", None)
            us = getattr(event, "cuda_time_total", 0.0) if us is None else us
            totals[event.key] = totals.get(event.key, 0.0) + us
        launches_per_step: dict[str, int] = {}
        for row in members:
            launches_per_step[row.kernel] = launches_per_step.get(row.kernel, 0) + 1
        for row in members:
            if row.kernel in totals:
                row.measured_us = totals[row.kernel] / iters / launches_per_step[row.kernel]
                row.notes.append(f"measured: torch.profiler, mean of {iters} steps")


def over_limit(table: Sequence[Row]) -> list[Row]:
    """Rows the acceptance rule flags: batch 1, ViT-B or ViT-L, above 5% of the layer."""
    return [r for r in table if r.batch == 1 and r.model in ("vit_b", "vit_l") and r.share > SHARE_LIMIT]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "kernels-model.json"))
    parser.add_argument("--methods", default=None, help="only these methods (comma-separated)")
    parser.add_argument("--measure", action="store_true", help="also measure every row on this GPU")
    args = parser.parse_args(argv)
    table = rows(method_names=args.methods.split(",") if args.methods else None)
    measured_on = None
    if args.measure:
        if not torch.cuda.is_available():
            print("--measure: skipped, no CUDA device here (the table holds the model's figures only)")
        else:
            measure(table)
            measured_on = machine("cuda")
    device = asdict(H200)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        dict(device=device, share_limit=SHARE_LIMIT, measured_on=measured_on, machine=machine("cpu"),
             rows=[asdict(r) for r in table]), indent=1))
    print(f"{'model':7} {'N':>5} {'B':>4} {'method':9} {'kernel':28} {'programs':>8} {'us':>8} "
          f"{'layer us':>9} share  measured us")
    flagged = {id(r) for r in over_limit(table)}
    for r in table:
        flag = "  <-- above 5%" if id(r) in flagged else ""
        measured = f"{r.measured_us:11.2f}" if r.measured_us is not None else f"{'-':>11}"
        print(f"{r.model:7} {r.tokens:5} {r.batch:4} {r.method:9} {r.kernel:28} {r.programs:8} "
              f"{r.model_us:8.3f} {r.layer_us:9.2f} {r.share:6.1%} {measured}{flag}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
