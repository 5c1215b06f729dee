"""The FLOP model of METHODS.md: multiply-accumulates per image for a ViT under a merge schedule.

A block costs ``4·N·C² + 2·N²·C`` for attention on its ``N`` input tokens plus ``2·m·N_out·C²``
for the MLP (ratio ``m``, 4 by default) on its ``N_out = N - r`` tokens (``N`` for a method that
reduces after the MLP, such as DCT); add the patch embedding. This reproduces ToMe's DeiT-S figures
(4.6 GMACs unmerged; 3.4 / 2.7 / 2.3 at r = 8 / 13 / 16 per block). The ideal speedup of a schedule
is the ratio of the unmerged to the merged total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["block_macs", "vit_macs", "ideal_speedup", "ViTDims", "vit_dims", "flops_report"]


def block_macs(n_in: Any, n_out: Any, dim: int, mlp_ratio: float = 4.0) -> Any:
    """MACs of one block that receives ``n_in`` tokens and passes ``n_out`` to its MLP (an int for
    int counts; tensors stay tensors, so a search can differentiate through the counts)."""
    macs = 4 * n_in * dim**2 + 2 * n_in**2 * dim + 2 * mlp_ratio * n_out * dim**2
    return int(macs) if isinstance(n_in, int) and isinstance(n_out, int) else macs


def per_block_macs(
    num_tokens: int, schedule: Sequence[int], dim: int, mlp_ratio: float = 4.0, site: str = "attention"
) -> list[int]:
    """MACs of every block; ``site="block"``: the reduction follows the MLP (DCT); ``site="ahead"``:
    at the block's input, one step ahead (MCTF): q, k and their map on the ``n`` unmerged tokens,
    the values, the map's product and the output projection on the ``n - r`` merged ones (what the
    official code computes; tomec's graph still runs a fused qkv projection whole on both token
    sets, ``n·C² + 2·(n − r)·C²`` more per merging block)."""
    out, n = [], num_tokens
    for r in schedule:
        if site == "ahead" and r > 0:
            m = n - r
            out.append(2 * n * dim * dim + n * n * dim + 2 * m * dim * dim + m * m * dim
                       + int(2 * mlp_ratio * m * dim * dim))
        else:
            out.append(block_macs(n, n if site == "block" else n - r, dim, mlp_ratio))
        n -= r
    return out


def vit_macs(
    num_tokens: int,
    schedule: Sequence[int],
    dim: int,
    *,
    mlp_ratio: float = 4.0,
    patch_macs: int = 0,
    site: str = "attention",
) -> int:
    """MACs per image: the blocks under ``schedule`` plus ``patch_macs``."""
    return patch_macs + sum(per_block_macs(num_tokens, schedule, dim, mlp_ratio, site))


def ideal_speedup(num_tokens: int, schedule: Sequence[int], dim: int, **kwargs: Any) -> float:
    """Unmerged MACs over merged MACs for the same model."""
    merged = vit_macs(num_tokens, schedule, dim, **kwargs)
    return vit_macs(num_tokens, [0] * len(schedule), dim, **kwargs) / merged


@dataclass(frozen=True)
class ViTDims:
    """What the FLOP model needs to know of a ViT."""

    num_blocks: int
    dim: int
    num_tokens: int  # entering the first block, protected ones included
    protected: int
    mlp_ratio: float
    patch_macs: int


def vit_dims(model: Any) -> ViTDims:
    """Read the dimensions of a timm ``VisionTransformer`` (works on a ``meta``-device model)."""
    blocks = getattr(model, "blocks", None)
    patch = getattr(model, "patch_embed", None)
    if blocks is None or patch is None or not hasattr(model, "embed_dim"):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer-like model")
    dim = int(model.embed_dim)
    protected = int(getattr(model, "num_prefix_tokens", 0))
    return ViTDims(
        num_blocks=len(blocks),
        dim=dim,
        num_tokens=int(patch.num_patches) + protected,
        protected=protected,
        mlp_ratio=blocks[0].mlp.fc1.out_features / dim,
        patch_macs=int(patch.proj.weight.numel()) * int(patch.num_patches),
    )


def flops_report(
    model: Any,
    method: str = "tome",
    r: Optional[int] = None,
    inflect: float = -0.5,
    schedule: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Schedule, tokens per block, MACs per block and in total, and the ideal speedup, computed from
    the model's dimensions alone (a timm model name is built on the ``meta`` device: no weights).
    ``options``: method options, and any other ``tomec.backend`` setting (those do not change FLOPs,
    except an integer ``protect``)."""
    import dataclasses

    from .config import TomecConfig

    settings = {f.name for f in dataclasses.fields(TomecConfig)} - {"method_options"}
    method_options = {k: v for k, v in options.items() if k not in settings}
    backend_settings = {k: v for k, v in options.items() if k in settings}

    if isinstance(model, str):
        import timm
        import torch

        with torch.device("meta"):
            model = timm.create_model(model, pretrained=False)
    dims = vit_dims(model)
    config = TomecConfig(method=method, r=r, inflect=inflect, schedule=schedule,
                         method_options=method_options, **backend_settings)
    protected = config.protect if isinstance(config.protect, int) else dims.protected
    plan = config.resolve_schedule(dims.num_blocks, dims.num_tokens, protected)
    site = config.method_spec.site_of(config.method_options)
    tokens, n = [], dims.num_tokens
    for v in plan:
        tokens.append(n)
        n -= v
    blocks = per_block_macs(dims.num_tokens, plan, dims.dim, dims.mlp_ratio, site)
    unmerged = per_block_macs(dims.num_tokens, [0] * len(plan), dims.dim, dims.mlp_ratio, site)
    total = dims.patch_macs + sum(blocks)
    base = dims.patch_macs + sum(unmerged)
    return {
        "method": config.method, "schedule": plan, "tokens_in": tokens, "tokens_out": n,
        "protected": protected, "dim": dims.dim, "block_macs": blocks,
        "patch_macs": dims.patch_macs, "macs": total, "unmerged_macs": base,
        "ideal_speedup": base / total,
    }
