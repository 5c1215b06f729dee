"""DiffRate's schedule search on the digits ViT, offline: searched schedules against untrained
DiffRate schedules at equal (or lower) MACs.

The untrained baseline at each budget is DiffRate merging only, every block keeping the same
fraction ``rho`` of the patch tokens it receives (at least one) (``rho = 0.5`` is ToMe's bipartite limit,
``[32, 16, 8, 4, 2, 1]``; smaller ``rho`` go past it, which DiffRate's merge allows). The search
targets the baseline's MACs (backbone frozen, training split, block 0 compressed too) once per seed;
every schedule runs on the test split through the compiled backend. 360 test images move accuracy in
steps of 0.28 points, so each budget reports the seeds' mean and spread and the test NLL.
Results: ``finetune-diffrate.json`` in :data:`tomec.machine.RESULTS` (``bench/results/`` in a
checkout).

    tomec finetune diffrate            # or: python -m tomec.bench.finetune_diffrate
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import digits
from .api import backend
from .cli_args import add_debug_argument, run_command
from .train.diffrate import schedule_macs, search_diffrate
from .flops import flops_report
from .machine import RESULTS as RESULTS_FOLDER

__all__ = ["RESULTS", "RHOS", "SEEDS", "STEPS", "geometric_kept", "run", "main"]

RESULTS = RESULTS_FOLDER / "finetune-diffrate.json"  # the result file (the name the tests read)
RHOS = (0.5, 0.35, 0.25)  # 25%, 19% and 16% of the unmerged MACs
SEEDS = 3
STEPS = 200


def geometric_kept(rho: float, patches: int = 64, blocks: int = 6) -> dict[str, list[int]]:
    """Merging only, each block keeping ``rho`` of its patch tokens (at least 1), CLS included."""
    kept = [1 + max(1, round(patches * rho ** (layer + 1))) for layer in range(blocks)]
    return {"prune_kept": [1 + patches] + kept[:-1], "merge_kept": kept}


def _scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kept: dict) -> dict[str, float]:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend(method="diffrate", kept=kept, compiler="eager"))
    return digits.scores_of(compiled, x, y)


def run(rhos: Sequence[float] = RHOS, seeds: int = SEEDS, steps: int = STEPS, distill: bool = False,
        out: Optional[Path] = RESULTS) -> list[dict[str, Any]]:
    """One row per budget: the baseline, one searched schedule per seed, and their summary."""
    torch.set_num_threads(1)
    model = digits.load_trained()
    x_train, y_train, x_test, y_test = digits.digits_data()
    unmerged = flops_report(model, "tome", r=0, measure=False)["macs"]  # as the search counts
    rows = []
    for rho in rhos:
        baseline = geometric_kept(rho)
        budget = schedule_macs(model, baseline)
        searched = []
        for seed in range(seeds):
            start = time.perf_counter()
            found = search_diffrate(model, x_train, y_train, target_macs=budget, steps=steps, seed=seed,
                                    compress_first=True, distill=distill, progress=False)
            searched.append({"seed": seed, "kept": found["kept"],
                             "macs_ratio": found["macs"] / unmerged,
                             "learned_macs_ratio": found["learned_macs"] / unmerged,
                             "scale": found["scale"], **_scores(model, x_test, y_test, found["kept"]),
                             "search_seconds": round(time.perf_counter() - start, 1)})
        row = {"rho": rho, "baseline_kept": baseline, "baseline_macs_ratio": budget / unmerged,
               "baseline": _scores(model, x_test, y_test, baseline), "searched": searched,
               "searched_summary": {m: digits.over_seeds(s[m] for s in searched)
                                    for m in ("accuracy", "nll", "macs_ratio")}}
        rows.append(row)
        acc = row["searched_summary"]["accuracy"]
        print(f"budget {row['baseline_macs_ratio']:.3f} of the MACs: untrained {baseline['merge_kept']} "
              f"{row['baseline']['accuracy']:.4f}; searched {acc['mean']:.4f} ± {acc['std']:.4f} "
              f"(min {acc['min']:.4f}, max {acc['max']:.4f}, {seeds} seeds)", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "machine": platform.node(), "torch": torch.__version__, "device": "cpu",
            "threads": torch.get_num_threads(), "steps": steps,
            "loss": "KL to the unmerged logits" if distill else "cross-entropy, labels",
            "unmerged": digits.scores_of(model, x_test, y_test), "test_images": len(y_test),
            "rows": rows,
        }, indent=1))
        print(f"wrote {out}")
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    """``tomec finetune diffrate``: the command line of :func:`run`."""
    parser = argparse.ArgumentParser(prog="tomec finetune diffrate", description=__doc__.splitlines()[0])
    add_debug_argument(parser)
    parser.add_argument("--rho", default=",".join(map(str, RHOS)),
                        help="the untrained baselines' per-block kept fractions (their MACs are the budgets)")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--distill", action="store_true",
                        help="search with the unmerged model's logits as the target instead of the labels")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run([float(v) for v in args.rho.split(",")], args.seeds, args.steps, args.distill, args.out)


if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
