"""Offline fine-tuning of DTEM's heads on the digits ViT (CPU, seeded, a couple of minutes).

The backbone (``bench/digits/vit_digits.pt``) stays frozen; only the per-block heads train, by soft
merging on the training split (:func:`tomec.dtem.train_heads`). At each large ``r`` (where merging
hurts) the test split is evaluated through the compiled backend (``compiler="eager"``) with the
same schedule, hence the same FLOPs, for: ToMe (keys), DTEM with its untrained seeded random heads,
DTEM with the trained heads. The trained heads go to ``bench/digits/dtem_heads_r{r}.pt`` and the
numbers to ``bench/results/finetune-dtem.json``, whatever they are.

    .venv/bin/python -m bench.finetune_dtem [--r 40,48,56] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import tomec
from .digits import CHECKPOINT, RESULTS, accuracy_of, digits_data, load_trained
from tomec.dtem import train_heads

HEADS_DIR = CHECKPOINT.parent
RESULT_FILE = RESULTS / "finetune-dtem.json"
# The recorded setting (the tests check the saved heads against these numbers).
RS = (56, 59)
STEPS = 150
LR = 3e-3
BATCH = 64
SEED = 0


def heads_path(r: int) -> Path:
    return HEADS_DIR / f"dtem_heads_r{r}.pt"


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, r: int,
             **options: Any) -> tuple[float, list[int]]:
    """Test accuracy through the compiled backend (eager compiler) and the schedule used."""
    torch._dynamo.reset()
    be = tomec.backend(method=method, r=r, compiler="eager", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-heads warning is expected here
        accuracy = accuracy_of(torch.compile(model, backend=be), x, y)
    return accuracy, list(be.schedule)


def run(rs: Sequence[int] = RS, steps: int = STEPS, lr: float = LR, out: Optional[Path] = RESULT_FILE,
        seed: int = SEED) -> dict[str, Any]:
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # the CPU is shared; one thread is also the fastest here
    model = load_trained()
    x, y, x_test, y_test = digits_data()
    rows = []
    unmerged = accuracy_of(model, x_test, y_test)
    for r in rs:
        start = time.perf_counter()
        heads = train_heads(model, (x, y), r=r, steps=steps, lr=lr, batch_size=BATCH, seed=seed)
        seconds = time.perf_counter() - start
        path = heads.save(heads_path(r))
        tome, schedule = evaluate(model, x_test, y_test, "tome", r)
        random_heads, s1 = evaluate(model, x_test, y_test, "dtem", r, seed=seed)
        trained, s2 = evaluate(model, x_test, y_test, "dtem", r, heads=path)
        assert schedule == s1 == s2  # equal FLOPs
        row = {"r": r, "schedule": schedule, "tome": tome, "dtem_random_heads": random_heads,
               "dtem_trained_heads": trained, "train_seconds": round(seconds, 1),
               "heads": str(path.relative_to(HEADS_DIR.parent.parent))}
        rows.append(row)
        print(f"r={r:3d} schedule {schedule}: ToMe {tome:.4f}  DTEM random heads {random_heads:.4f}  "
              f"DTEM trained heads {trained:.4f}  (trained in {seconds:.0f} s)")
    result = {
        "meta": {"machine": platform.node(), "torch": torch.__version__, "device": "cpu",
                 "threads": torch.get_num_threads(), "steps": steps, "lr": lr, "batch_size": BATCH,
                 "seed": seed, "k2": 3, "tau1": 0.1, "tau2": 0.1, "loss": "cross-entropy, labels",
                 "backbone": "frozen", "test_images": len(y_test), "unmerged": unmerged,
                 "evaluation": "tomec.backend(compiler='eager'), same schedule for all three"},
        "rows": rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", default=",".join(map(str, RS)))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    run([int(v) for v in args.r.split(",")], args.steps, args.lr, seed=args.seed)


if __name__ == "__main__":
    main()
