"""Accuracy on an ImageNet-style folder: the unmerged model and a merged one, in one run.

The folder holds one subfolder per class (sorted names give the class indices, as ImageNet's
``n01440764 ...`` do). Images get timm's evaluation preprocessing for the model. Weights come from
timm (``--pretrained``: works when they are cached or reachable) or ``--checkpoint PATH`` (a state
dict, or a dict with ``"model"``). Both models run on every batch; top-1 and top-5 counts are summed.

Multi-GPU and multi-node through ``torchrun`` (no DistributedDataParallel: inference only). Each rank
reads every ``world_size``-th image without the padding ``DistributedSampler`` adds, so every image
counts exactly once; the counts are all-reduced at the end (NCCL on CUDA, gloo on CPU).

    tomec eval --data /path/to/val --model deit_small_patch16_224 --pretrained --method tome --r 100
    torchrun --standalone --nproc_per_node 8 -m tomec.evaluate --data ... --reduce 100 --out results.json

(``--reduce`` is ``--r``'s long name: torchrun's parser takes a bare ``--r`` for one of its own;
``-m tomec.bench.accuracy``, the benchmark script's name, runs the same.)
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import cli_args, reference
from .api import backend
from .errors import ConfigError
from .models import load_model

__all__ = ["ExactDistributedSampler", "ClassCountWarning", "evaluate", "main"]


class ClassCountWarning(UserWarning):
    """The image folder has fewer classes than the model's head."""


class ExactDistributedSampler(DistributedSampler):
    """``DistributedSampler`` without the padding: rank ``k`` gets images ``k, k + W, k + 2W, ...``,
    so ranks may differ by one image and none is counted twice."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = top == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(dim=-1).sum())


def evaluate(
    data: str,
    model: str,
    *,
    pretrained: bool = False,
    checkpoint: Optional[str] = None,
    batch_size: int = 64,
    workers: int = 4,
    device: Optional[str] = None,
    compile_merged: bool = True,
    compiler: str = "inductor",
    limit: Optional[int] = None,
    num_classes: Optional[int] = None,
    **merge_kwargs: Any,
) -> dict[str, Any]:
    """Top-1/top-5 of the unmerged model and of ``tomec.backend(**merge_kwargs)`` on ``data``.

    Under ``torchrun`` each rank evaluates its share and the counts are all-reduced; every rank
    returns the totals. ``compile_merged=False`` runs the eager reference patch instead of the
    compiled backend. ``limit``: evaluate only the first ``limit`` images (at least 1).
    ``num_classes``: the head's size when it is not the model's default (a fine-tuned checkpoint).
    A folder with more classes than the head is an error; with fewer, a warning (its sorted names
    give indices 0..k-1, which match the head's classes only if they are its first k).
    """
    import timm  # timm and torchvision: seconds to import, paid by an evaluation only
    from torchvision.datasets import ImageFolder

    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1 image, got {limit}")
    if not os.path.isdir(data):
        code = errno.ENOTDIR if os.path.exists(data) else errno.ENOENT
        raise (NotADirectoryError if code == errno.ENOTDIR else FileNotFoundError)(
            code, "not an image folder" if code == errno.ENOTDIR else "no such image folder", str(data))

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)

    extra = {} if num_classes is None else {"num_classes": num_classes}
    net = load_model(model, pretrained, checkpoint, **extra).to(device)
    cfg = timm.data.resolve_data_config({}, model=net)
    dataset = ImageFolder(data, transform=timm.data.create_transform(**cfg, is_training=False))
    head = getattr(net, "num_classes", None)
    if head is not None and len(dataset.classes) > head:
        raise ConfigError(f"{data} has {len(dataset.classes)} classes but {model} predicts {head}; "
                          f"pass num_classes (--num-classes) for a fine-tuned head")
    if head is not None and len(dataset.classes) < head and rank == 0:
        warnings.warn(f"{data} has {len(dataset.classes)} classes but {model} predicts {head}: the sorted "
                      f"folder names are labels 0..{len(dataset.classes) - 1}, right only if they are the "
                      f"head's first {len(dataset.classes)} classes (--num-classes for a fine-tuned head)",
                      ClassCountWarning, stacklevel=2)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    sampler = ExactDistributedSampler(dataset, world, rank) if world > 1 else None
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)

    merge_kwargs.setdefault("method", "tome")
    if compile_merged:
        be = backend(compiler=compiler, **merge_kwargs)
        merged = torch.compile(net, backend=be)
    else:
        be = None
        merged = reference.patch(copy.deepcopy(net), **merge_kwargs)
    counts = torch.zeros(5, dtype=torch.float64)  # images, top-1 / top-5 unmerged, merged
    start = time.perf_counter()
    with torch.inference_mode():
        # Progress on a terminal only (None: tqdm's own check), so a log or a pipe keeps errors clean.
        for images, labels in tqdm(loader, desc=f"eval rank {rank}", disable=True if rank != 0 else None):
            images, labels = images.to(device), labels.to(device)
            c1, c5 = _topk_correct(net(images), labels)
            m1, m5 = _topk_correct(merged(images), labels)
            counts += torch.tensor([len(labels), c1, c5, m1, m5], dtype=torch.float64)
    seconds = time.perf_counter() - start
    if world > 1:
        reduced = counts.to(device) if device.startswith("cuda") else counts
        dist.all_reduce(reduced)
        counts = reduced.cpu()
    n = int(counts[0])
    schedule = be.schedule if be is not None else reference.state(merged).schedule
    return {
        "data": str(data), "model": model, "pretrained": pretrained, "checkpoint": checkpoint,
        "method": merge_kwargs["method"], "merge": {k: v for k, v in merge_kwargs.items() if k != "method"},
        "schedule": schedule, "images": n, "world_size": world,
        "unmerged": {"top1": counts[1].item() / n, "top5": counts[2].item() / n},
        "merged": {"top1": counts[3].item() / n, "top5": counts[4].item() / n},
        "seconds": seconds,
    }


def main(argv: Optional[list[str]] = None) -> None:
    """``tomec eval``: the command line of :func:`evaluate`; rank 0 prints (and writes) the JSON."""
    parser = argparse.ArgumentParser(prog="tomec eval", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ImageNet-style folder: one subfolder per class")
    parser.add_argument("--model", default=None, help="a timm name (default: deit_small_patch16_224, or the preset's)")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--checkpoint", default=None)
    cli_args.add_merge_arguments(parser)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--eager", action="store_true", help="the eager reference instead of compiling")
    parser.add_argument("--compiler", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images (N >= 1)")
    parser.add_argument("--num-classes", type=int, default=None, help="head size of a fine-tuned checkpoint")
    parser.add_argument("--out", default=None, help="JSON results (rank 0 writes)")
    cli_args.add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1 image, got {args.limit}")
    for flag, value in (("--batch", args.batch), ("--num-classes", args.num_classes)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    kwargs = {k: v for k, v in cli_args.merge_kwargs(args).items() if v is not None}
    result = evaluate(
        args.data, args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
        batch_size=args.batch, workers=args.workers, device=args.device,
        compile_merged=not args.eager, compiler=args.compiler, limit=args.limit,
        num_classes=args.num_classes, **kwargs,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli_args.run_command(main)  # an error is one line, as under the tomec command
