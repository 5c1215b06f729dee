"""LTMP (Learned Thresholds token Merging and Pruning, TMLR'23): merge, then prune, per block.

The official code (Mxbonn/ltmp, ``lt_mergeprune*.py``) merges first: each A token (even position)
whose best cosine score against the B tokens (odd positions) exceeds the block's merge threshold
merges into its best partner, ToMe's bipartite rule; then every token whose importance, the mean
attention it receives (softmax with the ``log(size)`` bias, averaged over heads and over all
queries), is at most the prune threshold is dropped. The CLS token is never pruned.

Every block rebuilds its sequence as A then B, also when it removes nothing (the official code
concatenates the unmerged A tokens and the B tokens in every block): the next block's A/B split
sees that order, so a block with zero counts is a permutation, not the identity.

tomec compiles a static graph, so a block removes fixed counts: ``n_merge`` by ToMe's rule (the
``n_merge`` best scores: the same tokens a threshold at the ``n_merge``-th score would pick) and
``n_prune`` by importance. One deviation keeps the number of dropped tokens static (``ops.merge``
needs it): a token that merged in this block, as source or destination, is not pruned in the same
block (the official code may prune a merged token, whose importance is then its members' largest).
:func:`ltmp_threshold_counts` gives the counts the thresholds would pick, per image; calibration
(``tomec.calibrate``) turns them into one static schedule.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tomec.errors import ConfigError

from .attention import attention_received
from .common import descending_rank
from .matching import _cosine, _interleave, _scoring_metric, bipartite_match

__all__ = ["ltmp_match", "ltmp_threshold_counts", "ltmp_prune_cap", "ab_order"]


def ltmp_prune_cap(n: int, protected: int, n_merge: int) -> int:
    """The most tokens a block may prune after merging ``n_merge``: the tokens no merge touched
    (at least ``T - 2·n_merge``), keeping one token when nothing is protected."""
    t = n - protected
    cap = t - 2 * n_merge
    if protected == 0:
        cap = min(cap, n - n_merge - 1)
    return max(cap, 0)


def _check_counts(n: int, protected: int, n_merge: int, n_prune: int) -> None:
    if not 0 <= protected <= n:
        raise ConfigError(f"protected={protected} is outside [0, {n}] for {n} tokens")
    merge_cap = (n - protected) // 2
    if not 0 <= n_merge <= merge_cap:
        raise ConfigError(
            f"LTMP: n_merge={n_merge} is outside [0, {merge_cap}] for {n} tokens with {protected} "
            f"protected"
        )
    prune_cap = ltmp_prune_cap(n, protected, n_merge)
    if not 0 <= n_prune <= prune_cap:
        raise ConfigError(
            f"LTMP: n_prune={n_prune} is outside [0, {prune_cap}] for {n} tokens with {protected} "
            f"protected after merging {n_merge}"
        )


def ltmp_match(
    keys: Tensor,
    q: Optional[Tensor],
    size: Optional[Tensor],
    n_merge: int,
    n_prune: int,
    protected: int = 0,
    *,
    scale: Optional[float] = None,
    prop_attn: bool = True,
    importance: Optional[Tensor] = None,
    impl: str = "torch",
) -> Tensor:
    """LTMP with static counts: ToMe's bipartite merge of ``n_merge``, then prune ``n_prune``.

    The pruned tokens are the ``n_prune`` least important non-protected tokens that no merge of
    this block touched (importance ties: the higher index is pruned first, as DiffRate's order).
    Output order: ToMe's (:func:`bipartite_match`), with the pruned slots removed.

    Args:
        keys: ``[B, H, N, d]`` the block's attention keys (or a ``[B, N, d]`` metric).
        q: ``[B, H, N, d]`` queries, for the importance (unused when ``n_prune == 0`` or
            ``importance`` is given). size: ``[B, N, 1]`` or None. scale: the logit scale.
        n_merge: tokens merged, ``0 <= n_merge <= (N - protected) // 2``.
        n_prune: tokens pruned, ``0 <= n_prune <= ltmp_prune_cap(N, protected, n_merge)``.
        importance: ``[B, N]`` precomputed importance (else :func:`~tomec.ops.attention_received`).

    Returns:
        ``dest [B, N]`` int64 in ``[0, N - n_merge - n_prune)``, ``-1`` for the pruned tokens; when
        nothing is removed, the A-then-B permutation (:func:`ab_order`).
    """
    batch, n = keys.shape[0], keys.shape[-2]
    _check_counts(n, protected, n_merge, n_prune)
    if n_merge + n_prune == 0:
        return ab_order(n, protected, keys.device).expand(batch, n)
    dest = bipartite_match(keys, n_merge, protected, impl=impl)
    if n_prune == 0:
        return dest
    # the attention received runs the Triton kernel on CUDA; the pruning itself stays PyTorch
    if importance is None:
        if q is None:
            raise ConfigError("LTMP: pruning needs the queries (or an importance)")
        importance = attention_received(q, keys, size, scale, prop_attn, impl=impl)
    device = keys.device
    n_mid = n - n_merge
    members = torch.zeros(batch, n_mid, dtype=torch.int64, device=device).scatter_add(
        1, dest, torch.ones_like(dest)
    )  # integer adds: exact and order-free
    touched = members.gather(1, dest) > 1  # source or destination of a merge in this block
    position = torch.arange(n, device=device)
    candidate = ~touched & (position >= protected)
    # Non-candidates rank as most important, so the last n_prune places are candidates only.
    score = torch.where(candidate, importance, torch.full_like(importance, float("inf")))
    pruned = descending_rank(score) >= n - n_prune
    slot_pruned = torch.zeros(batch, n_mid, dtype=torch.int64, device=device).scatter_add(
        1, dest, pruned.to(torch.int64)
    ) > 0
    new_slot = (~slot_pruned).cumsum(-1) - 1
    return torch.where(pruned, torch.full_like(dest, -1), new_slot.gather(1, dest))


def ab_order(n: int, protected: int, device: Optional[torch.device] = None) -> Tensor:
    """The slots of a block that removes nothing: the protected tokens first, then the other even
    positions (A), then the other odd ones (B), each in order; ``[N]`` int64, a permutation (ToMe's
    output order at r = 0, which needs no scores)."""
    position = torch.arange(n, device=device)
    n_a_free = (n + 1) // 2 - (protected + 1) // 2
    is_a = position % 2 == 0
    free = position >= protected
    slot_a = protected + (is_a & free).cumsum(0) - 1
    slot_b = protected + n_a_free + (~is_a & free).cumsum(0) - 1
    return torch.where(free, torch.where(is_a, slot_a, slot_b), position)


def _best_partner(metric: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    """ToMe's score of each A token (``[B, ⌈N/2⌉]``, protected rows and columns ``-inf``) and its
    best B partner, the quantities :func:`bipartite_match` ranks."""
    m = _scoring_metric(metric)
    a, b = m[:, ::2], m[:, 1::2]
    ia = torch.arange(a.shape[1], device=m.device)
    ib = torch.arange(b.shape[1], device=m.device)
    if b.shape[1] == 0:  # a single token: nothing to match
        return a.new_full(a.shape[:2], float("-inf")), ia.expand(a.shape[:2]) * 0
    blocked = (ia < (protected + 1) // 2).view(-1, 1) | (ib < protected // 2).view(1, -1)
    return _cosine(a, b).masked_fill(blocked, float("-inf")).max(dim=-1)


def ltmp_threshold_counts(
    keys: Tensor,
    q: Tensor,
    size: Optional[Tensor],
    protected: int,
    merge_threshold: float,
    prune_threshold: float,
    *,
    scale: Optional[float] = None,
    prop_attn: bool = True,
) -> tuple[Tensor, Tensor]:
    """The counts a block's thresholds pick, per image: ``(n_merge [B], n_prune [B])`` int64.

    ``n_merge``: non-protected A tokens whose best score exceeds ``merge_threshold`` (at most
    ToMe's cap). ``n_prune``: tokens, neither protected nor touched by those merges, whose importance
    is at most ``prune_threshold`` (at most :func:`ltmp_prune_cap`). :func:`ltmp_match` with these
    counts is then the thresholded block for that image.
    """
    n = keys.shape[-2]
    t = n - protected
    best, partner = _best_partner(keys, protected)
    n_merge = (best > merge_threshold).sum(-1).clamp(max=t // 2)
    is_src = descending_rank(best) < n_merge.unsqueeze(-1)  # [B, n_a]
    n_b = n // 2
    hit = partner.unsqueeze(-1) == torch.arange(n_b, device=keys.device)  # [B, n_a, n_b]
    dst = (hit & is_src.unsqueeze(-1)).any(1)  # [B, n_b]
    touched = _interleave(is_src, dst)
    importance = attention_received(q, keys, size, scale, prop_attn)
    candidate = ~touched & (torch.arange(n, device=keys.device) >= protected)
    low = (candidate & (importance <= prune_threshold)).sum(-1)
    cap = t - 2 * n_merge
    if protected == 0:
        cap = torch.minimum(cap, n - n_merge - 1)
    n_prune = torch.minimum(low, cap.clamp(min=0))
    return n_merge, n_prune
