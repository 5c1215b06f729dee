"""DiffRate's schedule search on the digits ViT, offline: searched schedules against the off-the-shelf
DiffRate schedule at equal (or lower) MACs.

For each budget, the off-the-shelf baseline is DiffRate with an ``r``-style schedule; the search
targets that schedule's MACs (backbone frozen, training split), and both run on the test split
through the compiled backend. Results: ``bench/results/finetune-diffrate.json``.

    python -m bench.finetune_diffrate            # or: tomec finetune diffrate
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import tomec
from . import digits
from tomec.diffrate_search import schedule_macs, search_diffrate
from tomec.flops import flops_report

RESULTS = digits.RESULTS / "finetune-diffrate.json"
# Off-the-shelf baselines (per-block counts of the 6-block digits ViT, 65 tokens): MACs from 25% to
# 40% of the unmerged model, where merging starts to cost accuracy on this data.
BASELINES = ([32, 16, 8, 4, 2, 1], [32, 16, 8, 0, 0, 0], [24, 12, 8, 4, 2, 0])


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **settings: Any) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=tomec.backend(method="diffrate", compiler="eager", **settings))
    return digits.accuracy_of(compiled, x, y)


def run(
    baselines: Sequence[Sequence[int]] = BASELINES,
    steps: int = 80,
    seed: int = 0,
    out: Optional[Path] = RESULTS,
) -> list[dict[str, Any]]:
    """Search one schedule per baseline budget; returns (and writes) one row per budget."""
    model = digits.load_trained()
    x_train, y_train, x_test, y_test = digits.digits_data()
    unmerged = flops_report(model, "tome", r=0)["macs"]
    rows = []
    for schedule in baselines:
        budget = flops_report(model, "diffrate", schedule=list(schedule))["macs"]
        start = time.perf_counter()
        found = search_diffrate(
            model, x_train, y_train, target_macs=budget, steps=steps, seed=seed, compress_first=True
        )
        rows.append({
            "baseline_schedule": list(schedule),
            "baseline_macs_ratio": budget / unmerged,
            "baseline_accuracy": _accuracy(model, x_test, y_test, schedule=list(schedule)),
            "searched_kept": found["kept"],
            "searched_macs_ratio": schedule_macs(model, found["kept"]) / unmerged,
            "searched_accuracy": _accuracy(model, x_test, y_test, kept=found["kept"]),
            "trimmed": found["trimmed"],
            "search_seconds": time.perf_counter() - start,
        })
        r = rows[-1]
        print(f"budget {r['baseline_macs_ratio']:.3f}: off the shelf {r['baseline_accuracy']:.4f}, "
              f"searched {r['searched_accuracy']:.4f} at {r['searched_macs_ratio']:.3f} "
              f"(kept {found['kept']})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "machine": platform.machine(), "torch": torch.__version__, "steps": steps, "seed": seed,
            "unmerged_accuracy": digits.accuracy_of(model, x_test, y_test), "rows": rows,
        }, indent=2))
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run(steps=args.steps, seed=args.seed, out=args.out)


if __name__ == "__main__":
    main()
