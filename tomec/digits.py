"""An offline study on real data: a small ViT trained on scikit-learn's handwritten digits.

scikit-learn ships 1,797 real 8×8 digit scans. Upsampled (bilinear) to 16×16 and cut into 2×2
patches, each gives 64 patch tokens plus CLS to a 6-block ViT (one token per scanned pixel, with its
neighbourhood's slope: single-pixel tokens train poorly on so little data), trained here on 80% of
them (seeded, CPU, about a minute), its weights shipped with the package in fp16
(``tomec/data/digits/vit_digits.pt``, :data:`CHECKPOINT`, beside the trained artifacts of the
fine-tuning studies). The study evaluates it on the other 20% unmerged and with every method over a
range of ``r``, through the compiled backend, and plots accuracy against throughput (a Pareto plot).

    tomec digits train      # regenerate the checkpoint
    tomec digits study      # ./digits.{csv,json,png} (--out DIR: elsewhere)

``ACCURACY_BOUND`` is the documented bound the tests hold every method to at ``MODERATE_R``. The
fine-tuning studies on this model (``tomec finetune``) are :mod:`tomec.digits_dtem`,
:mod:`tomec.digits_diffrate` and :mod:`tomec.digits_ltmp`.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import methods
from .api import backend
from .cli_args import add_debug_argument, parse_integers, run_command
from .errors import ConfigError
from .machine import RESULTS

__all__ = [
    "DATA", "CHECKPOINT", "RESULTS", "MODERATE_R", "ACCURACY_BOUND", "MIN_UNMERGED_ACCURACY", "digits_model",
    "digits_data", "load_trained", "train", "accuracy_of", "scores_of", "write_result", "over_seeds", "study",
    "pareto_plot", "main",
]

DATA = Path(__file__).resolve().parent / "data" / "digits"  # package data: the checkpoint, trained artifacts
CHECKPOINT = DATA / "vit_digits.pt"
MODERATE_R = 24  # of 64 patch tokens over 6 blocks
ACCURACY_BOUND = 0.05  # every method at MODERATE_R stays within 5 points of the unmerged model
MIN_UNMERGED_ACCURACY = 0.95


def digits_model() -> torch.nn.Module:
    """The study's ViT: 16×16 single-channel input, 2×2 patches (64 tokens), 6 blocks of width 64."""
    from timm.models.vision_transformer import VisionTransformer  # timm: seconds to import

    return VisionTransformer(
        img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
        mlp_ratio=2.0,
    )


def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test splits (80/20, fixed), images ``[N, 1, 16, 16]`` (the 8×8 scans upsampled),
    labels ``[N]``."""
    from sklearn.datasets import load_digits  # scikit-learn: seconds to import, a test dependency

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def load_trained(path: Path = CHECKPOINT) -> torch.nn.Module:
    """The trained study model (fp32, eval mode)."""
    model = digits_model()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def train(epochs: int = 60, out: Path = CHECKPOINT, seed: int = 0) -> float:
    """Train the study model (seeded); save fp16 weights; return test accuracy."""
    torch.manual_seed(seed)
    x, y, x_test, y_test = digits_data()
    model = digits_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * ((len(y) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="train"):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # jitter by half a scanned pixel
            batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(batch), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, out)
    print(f"test accuracy {accuracy:.4f}; wrote {out}")
    return accuracy


def accuracy_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on images ``x`` with labels ``y`` (no gradients)."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def scores_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test accuracy and mean negative log-likelihood (the NLL moves with every image's confidence,
    so it separates settings that 360 images' accuracy, in steps of 0.28 points, cannot)."""
    with torch.no_grad():
        logits = model(x)
    return {"accuracy": (logits.argmax(-1) == y).float().mean().item(),
            "nll": F.cross_entropy(logits, y).item()}


def write_result(result: dict[str, Any], out: Optional[Path]) -> None:
    """Write a study's JSON (indented) to ``out`` and say so; None writes nothing."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def over_seeds(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of one number measured once per seed."""
    values = list(values)
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "seeds": len(values)}


def study(
    method_names: Optional[Sequence[str]] = None,
    rs: Sequence[int] = (16, 32, 48, 56),
    compiler: str = "inductor",
    rounds: int = 15,
    out: Optional[Path] = None,
) -> list[dict[str, Any]]:
    """Accuracy and throughput of the compiled backend for every method and ``r``; writes
    ``digits.csv``, ``digits.json`` and the Pareto plot ``digits.png`` under ``out`` (default: the
    working directory; :data:`RESULTS` holds the shipped results) and says where."""
    model = load_trained()
    _, _, x_test, y_test = digits_data()
    rows = []
    names = list(method_names or methods.available())
    cases = [("unmerged", 0)] + [(m, r) for m in names for r in rs if r > 0]
    for name, r in tqdm(cases, desc="digits study"):
        torch._dynamo.reset()
        if name == "unmerged":
            fn = torch.compile(model) if compiler == "inductor" else model
        else:
            fn = torch.compile(model, backend=backend(method=name, r=r, compiler=compiler))
        with torch.no_grad():
            accuracy = accuracy_of(fn, x_test, y_test)
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                fn(x_test)
                times.append(time.perf_counter() - start)
        times.sort()
        rows.append({"method": name, "r": r, "accuracy": accuracy,
                     "images_per_s": len(y_test) / statistics.median(times),
                     "images_per_s_p20": len(y_test) / times[(4 * len(times)) // 5],
                     "images_per_s_p80": len(y_test) / times[len(times) // 5]})
    out = Path.cwd() if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "digits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {"machine": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "compiler": compiler, "test_images": len(y_test)}
    (out / "digits.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    pareto_plot(rows, out / "digits.png", compiler=compiler)
    print(f"wrote {out / 'digits'}.csv / .json / .png")
    return rows


COMPILER_LABELS = {"inductor": "compiled by Inductor", "eager": "eager PyTorch, not compiled"}


def pareto_plot(rows: list[dict[str, Any]], path: Path, compiler: str = "inductor") -> Any:
    """The accuracy-throughput plot, its axis labelled by the ``compiler`` the rows ran under;
    returns the (closed) figure."""
    import matplotlib  # seconds to import: only the plot pays for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    base = next(r for r in rows if r["method"] == "unmerged")
    ax.scatter([base["images_per_s"]], [base["accuracy"]], color="k", zorder=3, label="unmerged")
    for name in sorted({r["method"] for r in rows} - {"unmerged"}):
        pts = sorted(((r["images_per_s"], r["accuracy"], r["r"]) for r in rows if r["method"] == name),
                     key=lambda p: p[2])  # joined in order of r
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        for px, py, r in pts:
            ax.annotate(str(r), (px, py), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set(xlabel=f"images/s ({COMPILER_LABELS.get(compiler, compiler)}, CPU)", ylabel="test accuracy",
           title="digits ViT: accuracy against throughput (labels: r)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def main(argv: Optional[list[str]] = None) -> None:
    """``tomec digits train|study``."""
    parser = argparse.ArgumentParser(prog="tomec digits", description=__doc__.splitlines()[0])
    add_debug_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help=f"train the study model (writes {CHECKPOINT.name} in the package)")
    t.add_argument("--epochs", type=int, default=60)
    s = sub.add_parser("study", help="accuracy and throughput of every method (./digits.*)")
    s.add_argument("--methods", default=None)
    s.add_argument("--r", default="16,32,48,56", help="of 64 patch tokens; at most 63 over 6 blocks")
    s.add_argument("--compiler", choices=("inductor", "eager"), default="inductor")
    s.add_argument("--rounds", type=int, default=15, help="timed rounds per setting")
    s.add_argument("--out", default=None, help="folder for digits.{csv,json,png} (default: the working directory)")
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.epochs)
    else:
        if args.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
        rows = study(args.methods.split(",") if args.methods else None, parse_integers(args.r, "--r"),
                     args.compiler, rounds=args.rounds, out=None if args.out is None else Path(args.out))
        for row in rows:
            print(f"{row['method']:10}{row['r']:>4}  accuracy {row['accuracy']:.4f}  {row['images_per_s']:9.0f} img/s")


if __name__ == "__main__":
    run_command(main)  # an error is one line, as under the tomec command
