"""The FLOP model of METHODS.md: multiply-accumulates per image for a ViT under a merge schedule.

A block costs ``4·N·C² + 2·N²·C`` for attention on its ``N`` input tokens plus ``2·m·N_out·C²``
for the MLP (ratio ``m``, 4 by default) on its ``N_out = N - r`` tokens; add the patch embedding.
This reproduces ToMe's DeiT-S figures (4.6 GMACs unmerged; 3.4 / 2.7 / 2.3 at r = 8 / 13 / 16 per
block). The ideal speedup of a schedule is the ratio of the unmerged to the merged total.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["block_macs", "vit_macs", "ideal_speedup"]


def block_macs(n_in: int, n_out: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """MACs of one block that receives ``n_in`` tokens and passes ``n_out`` to its MLP."""
    return int(4 * n_in * dim**2 + 2 * n_in**2 * dim + 2 * mlp_ratio * n_out * dim**2)


def vit_macs(
    num_tokens: int,
    schedule: Sequence[int],
    dim: int,
    *,
    mlp_ratio: float = 4.0,
    patch_macs: int = 0,
) -> int:
    """MACs per image: the blocks under ``schedule`` (merge after attention) plus ``patch_macs``."""
    total, n = patch_macs, num_tokens
    for r in schedule:
        total += block_macs(n, n - r, dim, mlp_ratio)
        n -= r
    return total


def ideal_speedup(num_tokens: int, schedule: Sequence[int], dim: int, **kwargs) -> float:
    """Unmerged MACs over merged MACs for the same model."""
    merged = vit_macs(num_tokens, schedule, dim, **kwargs)
    return vit_macs(num_tokens, [0] * len(schedule), dim, **kwargs) / merged
