"""The main job (``make demo``): ToMe through tomec on DeiT-S, against Inductor and the eager reference.

Compiles ``deit_small_patch16_224`` (random weights: nothing is downloaded) once plainly with Inductor
and once with ``tomec.backend(method="tome", r=...)``, runs both on a real photo from matplotlib's
sample data, and prints images/s (interleaved rounds, medians), compile times, the per-block token
counts and the largest difference against the eager reference patch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import numpy as np
import torch

import tomec
from tomec import reference
from tomec.flops import vit_macs


def photo_batch(batch: int, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """``[batch, 3, size, size]``: crops and flips of matplotlib's sample photo, normalized."""
    import matplotlib.cbook as cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB")
    rng = np.random.default_rng(0)
    w, h = img.size
    crops = []
    for i in range(batch):
        side = int(min(w, h) * rng.uniform(0.6, 1.0))
        left, top = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        crop = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        arr = np.asarray(crop, dtype=np.float32) / 255.0
        crops.append(arr[:, ::-1] if i % 2 else arr)
    x = torch.from_numpy(np.stack(crops).copy()).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict:
    """Median and spread (min, max) of seconds per call, measured in interleaved rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - start) / reps)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", type=int, default=100, help="tokens removed in total")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    cfg = model.pretrained_cfg
    x = photo_batch(args.batch, cfg["input_size"][-1], cfg["mean"], cfg["std"])
    print(f"tomec demo: {args.model} (random weights), batch {args.batch} of crops of "
          f"matplotlib's grace_hopper.jpg, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")

    with torch.no_grad():
        start = time.perf_counter()
        plain = torch.compile(model, fullgraph=True)
        plain(x)
        plain_compile = time.perf_counter() - start

        be = tomec.backend(method="tome", r=args.r)
        start = time.perf_counter()
        merged = torch.compile(model, backend=be, fullgraph=True)
        out = merged(x)
        tomec_compile = time.perf_counter() - start

        ref = reference.patch(copy.deepcopy(model), "tome", r=args.r)
        expect = ref(x)
        err = (out - expect).abs().max().item()
        scale = expect.abs().max().item()

        timing = interleaved_medians(
            {"inductor": lambda: plain(x), "tomec": lambda: merged(x)}, args.rounds, reps=2
        )

    print(f"\nschedule (tokens removed per block): {be.schedule}")
    print(f"tokens entering each block:          {be.tokens_per_block}")
    print(f"tokens after the last block:         {be.tokens_per_block[-1] - be.schedule[-1]}")
    print(f"\n{'':22}{'images/s':>10}{'spread':>20}{'compile s':>12}")
    for name, compile_s in (("unmerged, Inductor", plain_compile), ("tomec ToMe", tomec_compile)):
        med, lo, hi = timing["inductor" if name.startswith("unmerged") else "tomec"]
        print(f"{name:22}{args.batch / med:10.1f}{f'{args.batch / hi:.1f}-{args.batch / lo:.1f}':>20}"
              f"{compile_s:12.1f}")
    patch_macs = model.patch_embed.proj.weight.numel() * model.patch_embed.num_patches
    macs = [
        vit_macs(be.tokens_per_block[0], s, model.embed_dim, patch_macs=patch_macs)
        for s in ([0] * len(be.schedule), be.schedule)
    ]
    speedup, ideal = timing["inductor"][0] / timing["tomec"][0], macs[0] / macs[1]
    print(f"GMACs per image: {macs[0] / 1e9:.2f} unmerged, {macs[1] / 1e9:.2f} merged")
    print(f"speedup over unmerged Inductor: {speedup:.2f}x of an ideal {ideal:.2f}x "
          f"({speedup / ideal:.0%} of the ideal)")
    print(f"max |tomec - eager reference| = {err:.2e} (logits scale {scale:.2f}, "
          f"relative {err / scale:.1e})")
    agree = (out.argmax(-1) == expect.argmax(-1)).float().mean().item()
    print(f"top-1 agreement with the reference: {agree:.0%}")


if __name__ == "__main__":
    main()
