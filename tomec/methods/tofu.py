"""ToFu (WACV'24): ToMe's matching; early blocks prune, later ones merge norm-preservingly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tomec.ops.bipartite import bipartite_match

from .core import LayerMerge, MatchInput, MatchResult, Method, Options, check_int, register

__all__ = ["TofuOptions", "tofu_prunes"]


def tofu_prunes(layer: int, num_layers: int, prune_blocks: Optional[int] = None) -> bool:
    """Whether ToFu's block ``layer`` prunes (else it merges norm-preservingly).

    ``prune_blocks=None`` is the public code's rule (PiToMe's ToFu port and the OpenToMe toolbox
    merge when ``layer > L // 2``): blocks ``0 .. L // 2``, i.e. ``L // 2 + 1`` of them (7 of 12).
    The paper states the principle (prune early, where the model is not linear in its inputs) but,
    as far as we could read it, no block index; ``prune_blocks=k`` prunes blocks ``0 .. k - 1``
    (``L // 2``: exactly the first half).
    """
    first_merging = num_layers // 2 + 1 if prune_blocks is None else prune_blocks
    return layer < first_merging


@dataclass(frozen=True)
class TofuOptions(Options):
    """``prune_blocks``: how many leading blocks prune (None: the public code's ``L // 2 + 1``)."""

    method = "tofu"
    prune_blocks: Optional[int] = None

    def __post_init__(self) -> None:
        self._set("prune_blocks", check_int(
            "tofu", "prune_blocks", self.prune_blocks, optional=True, kind="a block count >= 0",
            what=" or None (blocks 0 .. L//2 prune, as the public code)"))


def _layer_merge(options: TofuOptions, layer: int, num_layers: int, r: int) -> LayerMerge:
    if tofu_prunes(layer, num_layers, options.prune_blocks):
        return LayerMerge(r, n_dropped=r)
    return LayerMerge(r, mode="norm_preserving")


def _match(inp: MatchInput, options: TofuOptions) -> MatchResult:
    drop = inp.r > 0 and inp.n_dropped == inp.r  # a pruning block (its LayerMerge)
    return MatchResult(bipartite_match(inp.keys, inp.r, inp.protected, drop_sources=drop, impl=inp.impl))


register(Method(name="tofu", options=TofuOptions, match=_match, layer_merge=_layer_merge))
