"""Offline training of FPET's refinement adapter on the digits ViT (CPU, seeded, about a minute).

The backbone (``tomec/data/digits/vit_digits.pt``) stays frozen; only the 1-bit adapter at the reduction
block trains (:func:`tomec.train.fpet.train_adapter`: the official straight-through assignment, AdamW
with weight decay 1e-4, lr 1e-2: the official 1e-3 is for 100 epochs), with FPET's own setting: the middle block (3 of 6) merges every A token of
the checkerboard, 32 of the 64 patches. For each seed the test split is evaluated through the
compiled backend (``compiler="eager"``) without an adapter and with the trained one (the same
schedule, so the same FLOPs). Seed 0's adapter goes to ``tomec/data/digits/fpet_adapter.pt``, the
numbers to ``bench/results/finetune-fpet.json``, whatever they are.

    .venv/bin/python -m tomec.bench.finetune_fpet [--seeds 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

import tomec
from tomec.digits import DATA, RESULTS, digits_data, load_trained, over_seeds, scores_of, write_result
from tomec.train.fpet import train_adapter

ADAPTER = DATA / "fpet_adapter.pt"
RESULT_FILE = RESULTS / "finetune-fpet.json"
R = 32  # every A token of the 8 x 8 checkerboard
SEEDS = 3
STEPS = 150
LR = 1e-2  # the official 1e-3 runs 100 epochs; 150 steps here need a larger step to move the adapter
BATCH = 64


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **options: Any) -> dict[str, float]:
    """Test accuracy and NLL through the compiled backend (eager compiler), FPET at r = 32."""
    torch._dynamo.reset()
    be = tomec.backend(method="fpet", r=R, compiler="eager", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-adapter warning is expected for that arm
        return scores_of(torch.compile(model, backend=be), x, y)


def run(seeds: int = SEEDS, steps: int = STEPS, lr: float = LR, out: Optional[Path] = RESULT_FILE,
        adapter_out: Optional[Path] = ADAPTER) -> dict[str, Any]:
    """Train the adapter once per seed and evaluate it against FPET without one (the module's
    docstring); writes the result to ``out`` and seed 0's adapter to ``adapter_out`` (None: not
    written) and returns the result."""
    torch.set_num_threads(1)
    model = load_trained()
    x, y, x_test, y_test = digits_data()
    unmerged = scores_of(model, x_test, y_test)
    plain = evaluate(model, x_test, y_test)
    rows = []
    for seed in range(seeds):
        start = time.perf_counter()
        adapter = train_adapter(model, (x, y), steps=steps, lr=lr, batch_size=BATCH, seed=seed,
                                progress=False)
        seconds = time.perf_counter() - start
        if seed == 0 and adapter_out is not None:
            adapter.save(adapter_out)
        trained = evaluate(model, x_test, y_test, adapter=adapter)
        rows.append({"seed": seed, "trained_adapter": trained, "train_seconds": round(seconds, 1)})
        print(f"seed {seed}: FPET without adapter {plain['accuracy']:.4f}, with the trained adapter "
              f"{trained['accuracy']:.4f} (NLL {trained['nll']:.4f}) in {seconds:.0f} s", flush=True)
    summary = {m: over_seeds(r["trained_adapter"][m] for r in rows) for m in ("accuracy", "nll")}
    result = {
        "meta": {"machine": platform.node(), "torch": torch.__version__, "device": "cpu",
                 "threads": torch.get_num_threads(), "r": R, "block": 3, "steps": steps,
                 "batch_size": BATCH, "optimizer": f"AdamW lr {lr} wd 1e-4", "backbone": "frozen",
                 "loss": "cross-entropy, labels", "test_images": len(y_test), "unmerged": unmerged,
                 "adapter_file": "tomec/data/digits/fpet_adapter.pt (seed 0)",
                 "evaluation": "tomec.backend(compiler='eager'), the same schedule for both arms"},
        "no_adapter": plain, "rows": rows, "summary": summary,
    }
    write_result(result, out)
    return result


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--out", type=Path, default=RESULT_FILE)
    args = parser.parse_args(argv)
    run(args.seeds, args.steps, args.lr, args.out)


if __name__ == "__main__":
    main()
