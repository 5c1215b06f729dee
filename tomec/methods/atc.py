"""ATC (Agglomerative Token Clustering, ECCV'24): agglomerative clustering as a destination map.

Average (the default), complete or single linkage on the cosine distance, as the official code's
``linkage=`` choice (its README trains DeiT with complete linkage).

The clustering loop runs ``r`` merge steps, a static count; it lives in one custom op
(``tomec::atc_cluster``, with a fake kernel) so that Dynamo/Inductor see one node per block instead
of ``r`` unrolled steps. The op is batched over images and stays on the tokens' device (no host
round trip, no per-image loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tomec.errors import ConfigError

from tomec.ops.common import check_dtype, resolve_impl
from tomec.ops.bipartite import check_protected, cosine, key_metric, scoring_metric
from tomec.schedule import check_blocks

from .core import MatchInput, MatchResult, Method, Options, check_real, register

__all__ = ["AtcOptions", "atc_match", "atc_cluster", "atc_default_blocks", "atc_keep_rate_schedule", "atc_cap",
           "LINKAGES"]

LINKAGES = ("average", "complete", "single")


def atc_keep_rate_schedule(blocks: list[int], num_layers: int, num_tokens: int, protected: int,
                           keep_rate: float) -> list[int]:
    """The official keep-rate schedule: reduction block ``k`` (1-based, in ``blocks`` order) keeps
    ``int(T0 · ρ^k)`` clusters, ``T0 = num_tokens - protected`` (the patches; the protected tokens
    are kept aside); returns the per-block counts removed (0 at the other blocks). An error names
    the first block that would keep no cluster."""
    t0 = num_tokens - protected
    out, kept = [0] * num_layers, t0
    for k, block in enumerate(blocks, start=1):
        target = int(t0 * keep_rate**k)  # the official expression: num_patches * ratio ** (idx + 1)
        if target < 1:
            raise ConfigError(
                f"atc: keep_rate={keep_rate} keeps int({t0} * {keep_rate}^{k}) = {target} clusters at "
                f"reduction block {block}; at least 1 must remain"
            )
        out[block] = max(kept - target, 0)  # the count never grows
        kept = min(kept, target)
    return out


def atc_default_blocks(num_layers: int) -> list[int]:
    """ATC's reduction blocks: ``⌊k·L/4⌋`` for ``k = 1, 2, 3`` (distinct). For ``L = 12`` this is
    ``[3, 6, 9]``, the official code's 0-based ``--reduction_loc 3 6 9`` (the paper's "4th, 7th and
    10th block"); the floor keeps every index inside ``[0, L)`` for any depth."""
    return sorted({k * num_layers // 4 for k in (1, 2, 3)})


@torch.library.custom_op("tomec::atc_cluster", mutates_args=())
def atc_cluster(dist: Tensor, n_merges: int, linkage: str) -> Tensor:
    """Agglomerative clustering of ``T`` points, ``n_merges`` merge steps.

    Args:
        dist: ``[B, T, T]`` pairwise distances; only the upper triangle ``i < j`` is read.
        n_merges: merges to run, ``0 <= n_merges <= T - 1``; ``T - n_merges`` clusters remain.
        linkage: ``"average"``, ``"complete"`` (the largest pairwise distance between two
            clusters) or ``"single"`` (the smallest).

    Returns:
        ``[B, T]`` int64 cluster label of each point, clusters numbered by their lowest member.

    Each step merges the pair of clusters with the smallest average linkage; among equal linkages
    the smallest ``(i, j)`` pair in row-major order wins (``i < j`` index the clusters by their
    lowest member; a flattened argmin returns the first minimum). The linkage is kept in
    Lance-Williams form on the *sums* of pairwise distances, ``S(A∪B, C) = S(A, C) + S(B, C)``, and
    read as ``S / (|A|·|C|)``: each linkage is one rounding of its exact sum, so linkages that are
    equal in exact arithmetic compare equal whenever the sums are exact, and ties break by index.
    Complete and single linkage update by ``max`` / ``min`` (Lance-Williams), which round nothing:
    each linkage is one of the distances.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"atc_cluster: linkage must be one of {LINKAGES}, got {linkage!r}")
    batch, t, _ = dist.shape
    device = dist.device
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=device)
    idx = torch.arange(t, device=device)
    upper = idx.view(t, 1) < idx.view(1, t)
    # Read the upper triangle only and mirror it: a matmul-built matrix need not be exactly
    # symmetric, and the row-major tie rule needs it to be.
    sums = torch.where(upper, dist, dist.transpose(-1, -2))
    sums = sums.masked_fill(idx.view(t, 1) == idx.view(1, t), float("inf"))  # inf: not a live pair
    link = sums.clone()  # S / (|A| |C|); singletons: the distances themselves
    count = torch.ones(batch, t, dtype=dist.dtype, device=device)
    parent = idx.expand(batch, t).contiguous()  # each point's cluster (its lowest member)
    alive = torch.ones(batch, t, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    for _ in range(n_merges):
        flat = link.view(batch, t * t).argmin(-1)  # the first minimum in row-major order
        i, j = flat // t, flat % t  # i < j: the matrix is symmetric and its diagonal is inf
        count_i = count[rows, i] + count[rows, j]
        if linkage == "average":
            merged = sums[rows, i] + sums[rows, j]  # [B, T]; inf wherever either pair is dead
        else:  # the linkages themselves; a dead column is inf in both rows, so min keeps it inf
            merged = (torch.maximum if linkage == "complete" else torch.minimum)(sums[rows, i], sums[rows, j])
        merged[rows, i] = inf
        count[rows, i] = count_i
        merged_link = merged / (count_i.unsqueeze(-1) * count) if linkage == "average" else merged
        sums[rows, i], sums[rows, :, i] = merged, merged
        link[rows, i], link[rows, :, i] = merged_link, merged_link
        sums[rows, j], sums[rows, :, j] = inf, inf
        link[rows, j], link[rows, :, j] = inf, inf
        alive[rows, j] = False
        parent = torch.where(parent == j.unsqueeze(-1), i.unsqueeze(-1), parent)
    rank = alive.cumsum(-1) - 1  # a live cluster's place among the live ones, by lowest member
    return rank.gather(1, parent)


@atc_cluster.register_fake
def _(dist: Tensor, n_merges: int, linkage: str) -> Tensor:
    return dist.new_empty(dist.shape[:2], dtype=torch.int64)


def atc_match(
    metric: Tensor, r: int, protected: int = 0, *, linkage: str = "average", impl: str = "torch"
) -> Tensor:
    """ATC's clustering of the non-protected tokens into ``T - r`` clusters, as a destination map.

    Agglomerative clustering (``linkage``: average, complete or single) on the cosine distance ``1 - cos`` of the metric,
    stopped at exactly ``T - r`` clusters (``T = N - protected``); ties break toward the smallest
    ``(i, j)`` pair (see :func:`atc_cluster`). Output order: the protected tokens, then the
    clusters ordered by their lowest member index. Merge weights are the sizes (the shared
    size-weighted mean).

    Args:
        metric: ``[B, N, d]`` similarity features, or keys ``[B, H, N, d]`` (averaged over heads:
            ToMe's metric).
        r: tokens to remove, ``0 <= r <= T - 1`` (at least one cluster remains).
        protected: leading tokens that never merge.

    Returns:
        ``dest``: ``[B, N]`` int64 in ``[0, N - r)``.
    """
    check_dtype(metric.dtype, "the merge metric")
    if linkage not in LINKAGES:
        raise ConfigError(f"ATC: linkage must be one of {', '.join(LINKAGES)}, got {linkage!r}")
    if metric.dim() not in (3, 4):
        raise ConfigError(f"metric must be [B, N, d] or keys [B, H, N, d], got {list(metric.shape)}")
    use_triton = resolve_impl(impl, metric.device, "atc_cluster_triton") == "triton"
    if metric.dim() == 4:
        metric = key_metric(metric)
    batch, n, _ = metric.shape
    check_protected(n, protected)
    t = n - protected
    if not 0 <= r <= max(t - 1, 0):
        raise ConfigError(
            f"ATC: r={r} is outside [0, {max(t - 1, 0)}] for {n} tokens with {protected} protected "
            f"(at least one cluster must remain)"
        )
    device = metric.device
    head = torch.arange(protected, device=device).expand(batch, protected)
    if r == 0:
        return torch.arange(n, device=device).expand(batch, n)
    # The clustering is discrete: no gradient flows through it (the merge itself stays differentiable).
    unit = scoring_metric(metric[:, protected:].detach())  # fp32 at least: `1 - cos` decides merges
    dist = 1.0 - cosine(unit, unit)
    if use_triton:  # the same labels, bit for bit, from one launch (kernels/atc.py)
        labels = torch.ops.tomec.atc_cluster_triton(dist, r, linkage)
    else:
        labels = torch.ops.tomec.atc_cluster(dist, r, linkage)
    return torch.cat([head, protected + labels], dim=1)


def atc_cap(num_tokens: int, num_protected: int) -> int:
    """ATC's per-block cap: all but one of the mergeable tokens (at least one cluster remains)."""
    return max(num_tokens - num_protected - 1, 0)


@dataclass(frozen=True)
class AtcOptions(Options):
    """``blocks``: the reduction blocks (None: :func:`atc_default_blocks`); ``linkage``: average,
    complete or single; ``keep_rate``: the official schedule (block ``k`` keeps ``T0 · ρ^k``
    clusters) instead of ``r``."""

    method = "atc"
    schedule_field = "keep_rate"
    blocks: Optional[list[int]] = None
    linkage: str = "average"
    keep_rate: Optional[float] = None

    def __post_init__(self) -> None:
        if self.blocks is not None:  # the depth is checked when the schedule is resolved
            self._set("blocks", check_blocks(self.blocks, None, "atc: blocks"))
        if self.linkage not in LINKAGES:
            raise ConfigError(f"atc: linkage must be one of {', '.join(LINKAGES)}, got {self.linkage!r}")
        self._set("keep_rate", check_real("atc", "keep_rate", self.keep_rate, optional=True,
                                          kind="a number in (0, 1]", valid=lambda v: 0 < v <= 1))


def _blocks(options: AtcOptions, num_layers: int) -> list[int]:
    return atc_default_blocks(num_layers) if options.blocks is None else list(options.blocks)


def _schedule(options: AtcOptions, num_layers: int, num_tokens: int, protected: int) -> list[int]:
    blocks = check_blocks(_blocks(options, num_layers), num_layers, "atc: blocks")
    return atc_keep_rate_schedule(blocks, num_layers, num_tokens, protected, options.keep_rate)


def _match(inp: MatchInput, options: AtcOptions) -> MatchResult:
    return MatchResult(atc_match(inp.keys, inp.r, inp.protected, linkage=options.linkage, impl=inp.impl))


register(Method(name="atc", options=AtcOptions, match=_match, cap=atc_cap, schedule=_schedule,
                reduction_blocks=_blocks))
