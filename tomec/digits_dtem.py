"""Offline fine-tuning of DTEM's heads on the digits ViT (CPU, seeded, a few minutes).

The backbone (``tomec/data/digits/vit_digits.pt``) stays frozen; only the per-block heads train, by soft
merging on the training split (:func:`tomec.train.dtem.train_heads`) with the schedule they are evaluated
at: by default ``[32, 16, 8, 4, 2, 1]``, the most the bipartite cap allows (every block halves the
patch tokens; 25% of the unmerged MACs), where merging costs this model the most. For each seed the
test split is evaluated through the compiled backend (``compiler="eager"``), same schedule and so
same FLOPs, with DTEM's untrained (seeded random) heads and with the heads trained from them; ToMe
(keys) once. 360 test images move accuracy in steps of 0.28 points, so the script trains several
seeds and reports mean, spread and the per-seed paired difference, with the test NLL beside the
accuracy. Seed 0's heads go to ``tomec/data/digits/dtem_heads.pt`` (:data:`HEADS`), the numbers to
``finetune-dtem.json`` in :data:`tomec.machine.RESULTS` (``bench/results/`` in a checkout), whatever
they are.

    tomec finetune dtem [--seeds 10] [--steps 150] [--distill]     # or: python -m tomec.bench.finetune_dtem
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .api import backend
from .cli_args import add_debug_argument, parse_integers, run_command
from .digits import DATA, digits_data, load_trained, over_seeds, scores_of, write_result
from .train.dtem import train_heads
from .machine import RESULTS

__all__ = ["HEADS", "RESULT_FILE", "SCHEDULE", "SEEDS", "STEPS", "LR", "BATCH", "evaluate", "run", "main"]

HEADS = DATA / "dtem_heads.pt"
RESULT_FILE = RESULTS / "finetune-dtem.json"
SCHEDULE = (32, 16, 8, 4, 2, 1)
SEEDS = 10
STEPS = 150
LR = 3e-3
BATCH = 64


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, method: str,
             schedule: Sequence[int], **options: Any) -> dict[str, float]:
    """Test accuracy and NLL through the compiled backend (eager compiler) at ``schedule``."""
    torch._dynamo.reset()
    be = backend(method=method, schedule=list(schedule), compiler="eager", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-heads warning is expected here
        scores = scores_of(torch.compile(model, backend=be), x, y)
    if list(be.schedule) != list(schedule):  # every arm must run at the same FLOPs
        raise RuntimeError(f"{method} ran schedule {be.schedule}, not {list(schedule)}")
    return scores


def run(schedule: Sequence[int] = SCHEDULE, seeds: int = SEEDS, steps: int = STEPS, lr: float = LR,
        distill: bool = False, split: str = "random", out: Optional[Path] = RESULT_FILE,
        heads_out: Optional[Path] = HEADS) -> dict[str, Any]:
    """Train DTEM's heads once per seed and evaluate them against their untrained start and ToMe (the
    module's docstring); writes the result to ``out`` and seed 0's heads to ``heads_out`` (None: not
    written) and returns the result."""
    torch.set_num_threads(1)  # the CPU is shared; one thread is also the fastest here
    model = load_trained()
    x, y, x_test, y_test = digits_data()
    unmerged = scores_of(model, x_test, y_test)
    tome = evaluate(model, x_test, y_test, "tome", schedule)
    rows = []
    for seed in range(seeds):
        start = time.perf_counter()
        heads = train_heads(model, (x, y), schedule=list(schedule), steps=steps, lr=lr,
                            batch_size=BATCH, split=split, distill=distill, seed=seed,
                            progress=False)
        seconds = time.perf_counter() - start
        if seed == 0 and heads_out is not None:
            heads.save(heads_out)
        random_heads = evaluate(model, x_test, y_test, "dtem", schedule, seed=seed)
        trained = evaluate(model, x_test, y_test, "dtem", schedule, heads=heads.weights())
        row = {"seed": seed, "random_heads": random_heads, "trained_heads": trained,
               "train_seconds": round(seconds, 1)}
        rows.append(row)
        print(f"seed {seed}: DTEM random heads {row['random_heads']['accuracy']:.4f} "
              f"(NLL {row['random_heads']['nll']:.4f}), trained {row['trained_heads']['accuracy']:.4f} "
              f"(NLL {row['trained_heads']['nll']:.4f}) in {seconds:.0f} s", flush=True)
    summary = {arm: {metric: over_seeds(r[arm][metric] for r in rows) for metric in ("accuracy", "nll")}
               for arm in ("random_heads", "trained_heads")}
    gain = [r["trained_heads"]["accuracy"] - r["random_heads"]["accuracy"] for r in rows]
    summary["paired_accuracy_gain"] = over_seeds(gain)
    summary["paired_nll_change"] = over_seeds(
        r["trained_heads"]["nll"] - r["random_heads"]["nll"] for r in rows)
    summary["seeds_better_equal_worse"] = [sum(g > 0 for g in gain), sum(g == 0 for g in gain),
                                           sum(g < 0 for g in gain)]
    rand, tr = summary["random_heads"]["accuracy"], summary["trained_heads"]["accuracy"]
    print(f"ToMe {tome['accuracy']:.4f}; DTEM random heads {rand['mean']:.4f} ± {rand['std']:.4f}, "
          f"trained {tr['mean']:.4f} ± {tr['std']:.4f}; paired gain "
          f"{summary['paired_accuracy_gain']['mean']:+.4f} (better/equal/worse "
          f"{summary['seeds_better_equal_worse']})")
    result = {
        "meta": {"machine": platform.node(), "torch": torch.__version__, "device": "cpu",
                 "threads": torch.get_num_threads(), "schedule": list(schedule), "steps": steps,
                 "lr": lr, "batch_size": BATCH, "split": split, "k2": 3, "tau1": 0.1, "tau2": 0.1,
                 "loss": "KL to the unmerged logits" if distill else "cross-entropy, labels",
                 "backbone": "frozen", "test_images": len(y_test), "unmerged": unmerged,
                 "heads_file": "tomec/data/digits/dtem_heads.pt (seed 0)",
                 "evaluation": "tomec.backend(compiler='eager'), same schedule for every arm"},
        "tome": tome, "rows": rows, "summary": summary,
    }
    write_result(result, out)
    return result


def main(argv: Optional[list[str]] = None) -> None:
    """``tomec finetune dtem``: the command line of :func:`run`."""
    parser = argparse.ArgumentParser(prog="tomec finetune dtem", description=__doc__.splitlines()[0])
    add_debug_argument(parser)
    parser.add_argument("--schedule", default=",".join(map(str, SCHEDULE)))
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--distill", action="store_true",
                        help="train towards the unmerged model's logits instead of the labels")
    parser.add_argument("--split", choices=("random", "parity"), default="random",
                        help="the A/B split while training (DTEM's: random)")
    parser.add_argument("--out", type=Path, default=RESULT_FILE)
    args = parser.parse_args(argv)
    run(parse_integers(args.schedule, "--schedule"), args.seeds, args.steps, args.lr, args.distill,
        args.split, args.out)


if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
