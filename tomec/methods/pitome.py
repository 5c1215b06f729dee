"""PiToMe (NeurIPS'24): energy-ordered matching that keeps unique tokens (METHODS.md, PiToMe).

Tokens with high energy (many similar neighbours) are matched first; the first ``⌈L/2⌉`` blocks run
the "bsm" variant (alternate A/B over all tokens in energy order), the others merge only the ``2r``
most energetic tokens pairwise. The margin falls linearly with depth, as in the public code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tomec.ops.bipartite import check_metric, cosine, interleave, scoring_metric
from tomec.ops.common import descending_rank, resolve_impl

from .core import MatchInput, MatchResult, Method, Options, check_bool, check_real, register

__all__ = ["PitomeOptions", "pitome_match", "pitome_margin", "pitome_uses_bsm"]


def pitome_margin(layer: int, num_layers: int) -> float:
    """PiToMe's energy margin of a block (its public code): ``0.75 - 0.75 · layer / num_layers``."""
    return 0.75 - 0.75 * layer / num_layers


def pitome_uses_bsm(layer: int, num_layers: int, bsm_first: bool = True) -> bool:
    """Which variant a block runs: the first ``⌈L/2⌉`` blocks are "bsm" (the last ones for MAE)."""
    first_half = layer < math.ceil(num_layers / 2)
    return first_half if bsm_first else not first_half


def _gather_rows_cols(sim: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``sim[b, rows[b, i], cols[b, j]]``: ``[B, T, T]`` -> ``[B, len(rows), len(cols)]``."""
    batch, t, _ = sim.shape
    picked = sim.gather(1, rows.unsqueeze(-1).expand(batch, rows.shape[1], t))
    return picked.gather(2, cols.unsqueeze(1).expand(batch, rows.shape[1], cols.shape[1]))


def pitome_match(
    metric: Tensor, r: int, protected: int = 0, *, margin: float, bsm: bool, impl: str = "torch"
) -> Tensor:
    """PiToMe's energy-ordered matching, as a destination map (METHODS.md, PiToMe).

    The non-protected tokens are ordered by energy ``mean_j ELU(cos_ij − margin)`` (descending,
    ties to the lower index). ``bsm=True``: all of them alternate into A and B in that order, and the
    ``r`` A tokens with the best partners merge (ToMe's steps 3-4). ``bsm=False``: only the top
    ``2r`` alternate into A and B, and every A token merges into its best B token. Output order: the
    protected tokens, the kept tokens in energy order, then the B tokens in energy order.

    Args:
        metric: ``[B, N, d]``, or keys ``[B, H, N, d]`` (summed over heads).
        r: tokens to remove, ``0 <= r <= (N - protected) // 2``; 0 leaves the order alone.
        margin: the energy margin of this block (PiToMe: ``0.75 - 0.75 · layer / num_layers``).
        bsm: which of the two variants.

    Returns:
        ``dest``: ``[B, N]`` int64 in ``[0, N - r)``.
    """
    batch, n = check_metric(metric, r, protected)
    device = metric.device
    if r == 0:
        return torch.arange(n, device=device).expand(batch, n)
    if resolve_impl(impl, device, "pitome_match") == "triton":
        return torch.ops.tomec.pitome_match(metric, r, protected, float(margin), bool(bsm))
    m = scoring_metric(metric)[:, protected:]
    t = n - protected
    sim = cosine(m, m)  # [B, T, T]
    energy = torch.nn.functional.elu(sim - margin).mean(-1)
    rank = descending_rank(energy)  # each token's place in energy order
    order = rank.argsort(dim=-1)  # the token at each place (rank is a permutation)
    if bsm:
        side_a, side_b = order[:, 0::2], order[:, 1::2]
        n_a, n_b = side_a.shape[1], side_b.shape[1]
        best, partner = _gather_rows_cols(sim, side_a, side_b).max(dim=-1)
        is_src = descending_rank(best) < r
        kept_place = (~is_src).cumsum(-1) - 1
        slot_b = protected + (n_a - r) + torch.arange(n_b, device=device)
        slot_a = torch.where(is_src, slot_b[partner], protected + kept_place)
        slot_at = interleave(slot_a, slot_b.expand(batch, n_b))
    else:
        side_a, side_b = order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2]
        partner = _gather_rows_cols(sim, side_a, side_b).argmax(dim=-1)
        slot_b = protected + (t - 2 * r) + torch.arange(r, device=device)
        kept = protected + torch.arange(t - 2 * r, device=device)
        slot_at = torch.cat(
            [interleave(slot_b[partner], slot_b.expand(batch, r)), kept.expand(batch, t - 2 * r)], 1
        )
    tail = slot_at.gather(1, rank)  # token i sits at place rank[i]
    head = torch.arange(protected, device=device).expand(batch, protected)
    return torch.cat([head, tail], dim=1)



@dataclass(frozen=True)
class PitomeOptions(Options):
    """``bsm_first``: the first half of the blocks runs "bsm" (False: the last half, PiToMe's MAE
    setting); ``margin``: one energy margin for every block (None: the per-block schedule)."""

    method = "pitome"
    bsm_first: bool = True
    margin: Optional[float] = None

    def __post_init__(self) -> None:
        check_bool("pitome", "bsm_first", self.bsm_first)
        self._set("margin", check_real("pitome", "margin", self.margin, optional=True,
                                       what=" or None (per-block schedule)"))


def _match(inp: MatchInput, options: PitomeOptions) -> MatchResult:
    margin = pitome_margin(inp.layer, inp.num_layers) if options.margin is None else options.margin
    bsm = pitome_uses_bsm(inp.layer, inp.num_layers, options.bsm_first)
    return MatchResult(pitome_match(inp.keys, inp.r, inp.protected, margin=margin, bsm=bsm, impl=inp.impl))


register(Method(name="pitome", options=PitomeOptions, match=_match))
