"""Which patches merged: each final token's group of patches drawn on the input image.

Every group is filled with its pixels' mean colour and outlined; dropped patches (pruning methods)
are shown dark. The groups come from the source map (``[N0]``: the final slot of every original
token) of the compiled path (``backend.last_info``) or of the eager reference. At several depths:
the partition after block ``d`` depends only on blocks ``0..d``, so depth ``d`` runs the schedule
with every later entry set to 0.

    tomec vis --image photo.jpg --model deit_small_patch16_224 --method tome --r 100 --depths 4,8,12
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import cli_args, methods, reference
from .api import backend
from .errors import ConfigError, UnsupportedModelError
from .models import load_model

__all__ = ["groups_image", "source_maps", "check_depths", "normalize", "render", "load_image", "main"]


def groups_image(
    image: np.ndarray, slots: np.ndarray, line: Sequence[float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """Paint a patch partition.

    Args:
        image: ``[H, W, 3]`` floats in [0, 1]; H and W multiples of the patch grid.
        slots: ``[gh, gw]`` ints: the group of every patch (``-1``: dropped).
        line: boundary colour.

    Returns:
        ``[H, W, 3]``: group mean colours, boundaries between different groups, dropped patches dark.
    """
    gh, gw = slots.shape
    height, width, _ = image.shape
    ph, pw = height // gh, width // gw
    patch_of_pixel = np.repeat(np.repeat(slots, ph, axis=0), pw, axis=1)  # [H, W]
    out = np.zeros_like(image)
    for slot in np.unique(slots):
        where = patch_of_pixel == slot
        out[where] = image[where].mean(axis=0) if slot >= 0 else image[where] * 0.15
    edge = np.zeros((height, width), dtype=bool)
    edge[:, :-1] |= patch_of_pixel[:, :-1] != patch_of_pixel[:, 1:]
    edge[:-1, :] |= patch_of_pixel[:-1, :] != patch_of_pixel[1:, :]
    out[edge] = line
    return out


def num_blocks(model: torch.nn.Module) -> int:
    """The blocks of a timm ViT (``model.blocks``); another model is an ``UnsupportedModelError``."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or getattr(model, "patch_embed", None) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no patch_embed and blocks: tomec vis draws timm Vision Transformers")
    return len(blocks)


def check_depths(
    model: torch.nn.Module, depths: Optional[Sequence[int]], *, name: Optional[str] = None,
    what: str = "depths",
) -> list[int]:
    """``depths`` (counts of blocks applied, 1..L; None or empty: ``[L]``) checked against the
    model's ``L`` blocks: anything else is a ``ConfigError`` that names the valid range (``name``:
    the model's name in it; ``what``: the argument's)."""
    count = num_blocks(model)
    depths = list(depths or [])
    if not depths:
        return [count]
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= count]
    if bad:
        raise ConfigError(
            f"{what} {','.join(map(str, bad))} out of range: {name or type(model).__name__} has {count} "
            f"blocks, so a depth (the number of blocks applied) is 1..{count}")
    return [int(d) for d in depths]


def _truncated(schedule: Sequence[int], depth: int) -> list[int]:
    return [v if i < depth else 0 for i, v in enumerate(schedule)]


def source_maps(
    model: torch.nn.Module,
    x: torch.Tensor,
    depths: Sequence[int],
    *,
    path: str = "compiled",
    compiler: str = "inductor",
    **merge_kwargs: Any,
) -> tuple[list[torch.Tensor], int]:
    """Source maps ``[B, N0]`` after blocks ``depths`` (1-based counts of blocks), and the number of
    protected tokens. ``path``: ``"compiled"`` (the tomec backend) or ``"reference"`` (eager)."""
    method = merge_kwargs.get("method", "tome")
    if not methods.get(method).supports_source:
        raise ConfigError(f"method {method!r} has no source map to draw")
    depths = check_depths(model, depths)
    ref = reference.patch(copy.deepcopy(model), **merge_kwargs, trace_source=True)
    with torch.no_grad():
        ref(x)
    full = reference.state(ref).schedule
    protected = reference.state(ref).protected
    options = {k: v for k, v in merge_kwargs.items() if k not in ("r", "inflect", "schedule")}
    maps = []
    for depth in depths:
        schedule = _truncated(full, depth)
        if path == "reference":
            patched = reference.patch(copy.deepcopy(model), schedule=schedule, trace_source=True, **options)
            with torch.no_grad():
                patched(x)
            maps.append(reference.state(patched).source)
        else:
            torch._dynamo.reset()
            be = backend(schedule=schedule, trace_source=True, compiler=compiler, **options)
            with torch.no_grad():
                torch.compile(model, backend=be, fullgraph=True)(x)
            maps.append(be.last_info["source"])
    return maps, protected


def normalize(image: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """``[H, W, 3]`` in [0, 1] -> ``[1, 3, H, W]`` with the model's mean and std (timm's config)."""
    import timm  # seconds to import: paid when an image is drawn, not by ``import tomec.vis``

    cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    return ((torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() - mean) / std)[None]


def render(
    image: np.ndarray,
    model: torch.nn.Module,
    depths: Optional[Sequence[int]] = None,
    *,
    path: str = "compiled",
    compiler: str = "inductor",
    **merge_kwargs: Any,
) -> list[tuple[int, np.ndarray, int]]:
    """Draw the merge groups of ``image`` (``[H, W, 3]`` in [0, 1], already at the model's input
    size) at each depth (default: after the last block). Returns ``(depth, picture, groups)``."""
    depths = check_depths(model, depths)
    x = normalize(image, model)
    grid = model.patch_embed.grid_size
    maps, protected = source_maps(model, x, depths, path=path, compiler=compiler, **merge_kwargs)
    out = []
    for depth, source in zip(depths, maps):
        slots = source[0, protected:].numpy().reshape(grid)
        groups = len(np.unique(slots[slots >= 0]))
        out.append((depth, groups_image(image, slots), groups))
    return out


def load_image(path: Optional[str], size: int) -> np.ndarray:
    """A square RGB crop in [0, 1] at ``size`` pixels; matplotlib's sample photo when no path."""
    from PIL import Image

    if path is None:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            img = Image.open(f).convert("RGB")
    else:
        img = Image.open(path).convert("RGB")
    side = min(img.size)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def main(argv: Optional[list[str]] = None) -> None:
    """``tomec vis``: draw the groups at ``--depths`` beside the input image into ``--out`` (PNG)."""
    parser = argparse.ArgumentParser(prog="tomec vis", description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=None, help="default: matplotlib's grace_hopper.jpg")
    parser.add_argument("--model", default=None, help="a timm name (default: deit_small_patch16_224, or the preset's)")
    parser.add_argument("--pretrained", action="store_true", help="timm weights (cached or reachable)")
    parser.add_argument("--checkpoint", default=None)
    cli_args.add_merge_arguments(parser)
    parser.add_argument("--depths", default=None, help="blocks applied, e.g. 4,8,12 (default: all)")
    parser.add_argument("--path", choices=("compiled", "reference"), default="compiled")
    parser.add_argument("--compiler", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--out", default="tomec_vis.png")
    cli_args.add_debug_argument(parser)
    args = parser.parse_args(argv)

    import matplotlib  # seconds to import: after the arguments, so a usage error is quick

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kwargs = {k: v for k, v in cli_args.merge_kwargs(args).items() if v is not None}  # first: a preset's model
    model = load_model(args.model, args.pretrained, args.checkpoint)
    image = load_image(args.image, model.pretrained_cfg["input_size"][-1])
    depths = None
    if args.depths is not None:
        depths = check_depths(model, cli_args.parse_integers(args.depths, "--depths"), name=args.model,
                              what="--depths")
    panels = render(image, model, depths, path=args.path, compiler=args.compiler, **kwargs)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 4))
    axes[0].imshow(image)
    axes[0].set_title("input")
    for ax, (depth, picture, groups) in zip(axes[1:], panels):
        ax.imshow(picture)
        ax.set_title(f"after block {depth}: {groups} groups")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{args.model}, {kwargs['method']}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli_args.run_command(main)  # an error is one line, as under the tomec command
