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
(``tomec.train.ltmp``) turns them into one static schedule.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from tomec.errors import ConfigError, ScheduleError
from tomec.files import read_json_option

from tomec.ops.attention import attention_received
from tomec.ops.common import descending_rank
from tomec.ops.bipartite import best_partner, bipartite_match, check_protected, interleave

from .core import LayerMerge, MatchInput, MatchResult, Method, Options, register

__all__ = [
    "LtmpOptions", "ltmp_match", "ltmp_threshold_counts", "ltmp_prune_cap", "ab_order", "load_ltmp_counts",
    "load_ltmp_thresholds",
]


def ltmp_prune_cap(n: int, protected: int, n_merge: int) -> int:
    """The most tokens a block may prune after merging ``n_merge``: the tokens no merge touched
    (at least ``T - 2·n_merge``), keeping one token when nothing is protected."""
    t = n - protected
    cap = t - 2 * n_merge
    if protected == 0:
        cap = min(cap, n - n_merge - 1)
    return max(cap, 0)


def _check_counts(n: int, protected: int, n_merge: int, n_prune: int) -> None:
    check_protected(n, protected)
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
    best, partner = best_partner(keys, protected)
    n_merge = (best > merge_threshold).sum(-1).clamp(max=t // 2)
    is_src = descending_rank(best) < n_merge.unsqueeze(-1)  # [B, n_a]
    n_b = n // 2
    hit = partner.unsqueeze(-1) == torch.arange(n_b, device=keys.device)  # [B, n_a, n_b]
    dst = (hit & is_src.unsqueeze(-1)).any(1)  # [B, n_b]
    touched = interleave(is_src, dst)
    importance = attention_received(q, keys, size, scale, prop_attn)
    candidate = ~touched & (torch.arange(n, device=keys.device) >= protected)
    low = (candidate & (importance <= prune_threshold)).sum(-1)
    cap = t - 2 * n_merge
    if protected == 0:
        cap = torch.minimum(cap, n - n_merge - 1)
    n_prune = torch.minimum(low, cap.clamp(min=0))
    return n_merge, n_prune


# --- the method: calibrated static counts ---------------------------------------------------


def _load_ltmp_pair(value: Any, what: str, kind: type) -> dict[str, list]:
    """``{"merge": [...], "prune": [...]}`` per block (other keys, e.g. provenance, are kept out),
    or a path to such JSON (as ``tomec calibrate`` / the threshold training write)."""
    value = read_json_option(value, "ltmp", what)
    if not isinstance(value, Mapping) or not {"merge", "prune"} <= set(value):
        raise ConfigError(
            f"ltmp: {what} must map 'merge' and 'prune' to per-block lists, got {value!r}"
        )
    out = {}
    for name in ("merge", "prune"):
        values = value[name]
        ok = isinstance(values, (list, tuple)) and all(
            isinstance(v, kind) and not isinstance(v, bool) and (kind is numbers.Real or v >= 0)
            for v in values
        )
        if not ok:
            must = "non-negative ints" if kind is numbers.Integral else "numbers"
            raise ConfigError(f"ltmp: {what}['{name}'] must be a list of {must}, got {values!r}")
        out[name] = [int(v) if kind is numbers.Integral else float(v) for v in values]
    if len(out["merge"]) != len(out["prune"]):
        raise ConfigError(
            f"ltmp: {what} has {len(out['merge'])} merge entries and {len(out['prune'])} prune entries"
        )
    return out


def load_ltmp_counts(counts: Any) -> dict[str, list[int]]:
    """A calibrated LTMP schedule: tokens merged and pruned per block, or a path to its JSON."""
    return _load_ltmp_pair(counts, "counts", numbers.Integral)


def load_ltmp_thresholds(thresholds: Any) -> dict[str, list[float]]:
    """LTMP thresholds per block (``merge``: cosine score, ``prune``: mean attention received)."""
    return _load_ltmp_pair(thresholds, "thresholds", numbers.Real)


def _schedule(options: "LtmpOptions", num_layers: int, num_tokens: int, protected: int) -> list[int]:
    counts = options.counts
    if len(counts["merge"]) != num_layers:
        raise ScheduleError(
            f"ltmp: the counts have {len(counts['merge'])} entries but the model has {num_layers} "
            f"attention blocks"
        )
    out, n = [], num_tokens
    for layer, (m, p) in enumerate(zip(counts["merge"], counts["prune"])):
        merge_cap = (n - protected) // 2
        if m > merge_cap:
            raise ScheduleError(
                f"ltmp: block {layer} merges {m} of {n} tokens ({protected} protected); at most "
                f"{merge_cap}"
            )
        prune_cap = ltmp_prune_cap(n, protected, m)
        if p > prune_cap:
            raise ScheduleError(
                f"ltmp: block {layer} prunes {p} of {n} tokens after merging {m} ({protected} "
                f"protected); at most {prune_cap}"
            )
        out.append(m + p)
        n -= m + p
    return out


NO_COUNTS_WARNING = (
    "ltmp: no counts= given, so nothing is pruned and LTMP is ToMe's merging with the r / schedule= "
    "counts; learn thresholds (tomec.train.ltmp.train_thresholds) and turn them into counts with "
    "`tomec calibrate`"
)


@dataclass(frozen=True)
class LtmpOptions(Options):
    """``counts``: calibrated tokens merged and pruned per block (or their JSON path, as `tomec
    calibrate` writes it). ``thresholds`` are refused with the way to turn them into counts: a
    compiled graph cannot remove a different number of tokens per image."""

    method = "ltmp"
    schedule_field = "counts"
    counts: Optional[Mapping[str, list[int]]] = None
    thresholds: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.thresholds is not None:
            load_ltmp_thresholds(self.thresholds)  # malformed thresholds get their own error first
            if self.counts is None:
                raise ConfigError(
                    "ltmp: thresholds pick a different number of tokens per image, which a compiled "
                    "graph cannot; turn them into static per-block counts with `tomec calibrate "
                    "--model ... --thresholds <json> --out counts.json` (or tomec.train.ltmp.calibrate) "
                    "and pass counts='counts.json'"
                )
            raise ConfigError(
                "ltmp: give counts= only; thresholds= next to counts= would be ignored (the calibrated "
                "counts already came from thresholds; `tomec calibrate` records them in its JSON)"
            )
        if self.counts is not None:
            self._set("counts", load_ltmp_counts(self.counts))


def _layer_merge(options: LtmpOptions, layer: int, num_layers: int, r: int) -> LayerMerge:
    pruned = options.counts["prune"][layer] if options.counts is not None and r > 0 else 0
    return LayerMerge(r, n_dropped=pruned)


def _match(inp: MatchInput, options: LtmpOptions) -> MatchResult:
    return MatchResult(ltmp_match(inp.keys, inp.queries, inp.size, inp.r - inp.n_dropped, inp.n_dropped,
                                  inp.protected, scale=inp.scale, prop_attn=inp.prop_attn, impl=inp.impl))


def _advise(options: LtmpOptions) -> Optional[str]:
    return NO_COUNTS_WARNING if options.counts is None else None


# Every block rebuilds its sequence as A then B, also at count 0 (reorders_at_r0).
register(Method(name="ltmp", options=LtmpOptions, match=_match, schedule=_schedule, layer_merge=_layer_merge,
                reorders_at_r0=True, advise=_advise))
