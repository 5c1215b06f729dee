"""CrossGET's complete-graph soft matching, vision-only form (METHODS.md, CrossGET).

Settled against the official code (sdc17/CrossGET, ``clip/reducer.py`` of its CLIP and CoOp
folders); the cross-modal parts (the learned cross token, text guidance) are left out:

- Similarity: cosine of the in-projected keys with the heads concatenated (``[B, N, H·d]``, the
  official code's ``k`` before the per-head reshape; not the head mean, which picks different
  partners), every token against every other; the diagonal and the protected tokens are masked.
- Importance: cosine between a token's key and the *guide token's* query, both heads concatenated. The official vision
  branch appends a cross token that starts as a copy of the CLS token plus a learned offset
  (zero-initialised); without that learned offset it is exactly the CLS token, so the guide here
  is token 0 (the CLS). Without protected tokens there is no guide: importance is 0 everywhere.
- Conflict avoidance: tokens are ranked by their best similarity (descending); a token's adjusted
  similarity is its best similarity to tokens ranked *after* it. Sources are the ``r`` tokens with
  the largest ``adjusted − importance``; each merges into its most similar non-source token, so a
  source is never a destination and exactly ``r`` tokens go.
- Weights: the official code takes a softmax of the importance over each (source, destination)
  pair and then divides by summed sizes; here ``w ∝ size · exp(importance)``, i.e. a softmax of
  importance (plus log size) over each merged group, which equals the official result for a pair of
  equal-size tokens and stays a proper weighted mean for larger groups.
- Output order: the kept (non-source) tokens in their original order (protected ones first).

With ``impl="triton"`` (fp32 scores; fp64 stays PyTorch) the three row maxima (best similarity,
adjusted similarity, destination) run in ``torch.ops.tomec.crossget_rowmax``, which recomputes the
symmetric cosine tile by tile with the same formula and roundings: no ``N × N`` tensor is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tomec.errors import ConfigError

from tomec.ops.common import check_dtype, descending_rank, inv_norm, resolve_impl
from tomec.ops.bipartite import check_metric, cosine, scoring_metric

from .core import MatchInput, MatchResult, Method, Options, check_bool, register

__all__ = ["CrossgetOptions", "crossget_match", "crossget_importance", "concat_heads"]


def concat_heads(t: Tensor) -> Tensor:
    """Keys or queries ``[B, H, N, d]`` with the heads side by side, ``[B, N, H·d]`` (the attention's
    in-projection before its per-head reshape); ``[B, N, d]`` passes through."""
    if t.dim() != 4:
        return t
    batch, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(batch, n, heads * d)


def crossget_importance(metric: Tensor, query: Tensor, protected: int, guided: bool = True) -> Tensor:
    """Each token's importance: cosine of its metric with the guide token's (token 0's) query.

    Args:
        metric, query: ``[B, N, d]``, or keys / queries ``[B, H, N, d]`` (heads concatenated).

    Returns:
        ``[B, N]`` in fp32 (fp64 for fp64 inputs); zeros when ``protected == 0`` (no guide) or
        ``guided=False`` (the unguided ablation).
    """
    return _importance(scoring_metric(concat_heads(metric)), query, protected, guided)


def _importance(m: Tensor, query: Tensor, protected: int, guided: bool) -> Tensor:
    """:func:`crossget_importance` on the scoring metric ``m [B, N, d]`` (already widened)."""
    if protected == 0 or not guided:
        return m.new_zeros(m.shape[:2])
    guide = scoring_metric(concat_heads(query[..., :1, :]))  # [B, 1, H·d]: the guide's row only
    return cosine(m, guide).squeeze(-1)


def crossget_match(
    metric: Tensor,
    query: Tensor,
    r: int,
    protected: int = 0,
    *,
    x: Optional[Tensor] = None,
    size: Optional[Tensor] = None,
    guided: bool = True,
    impl: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    """CrossGET's complete-graph matching and importance-weighted ensemble, as a destination map.

    Args:
        metric: ``[B, N, d]`` similarity features, or the attention keys ``[B, H, N, d]`` (heads
            concatenated into ``[B, N, H·d]``).
        query: the queries, same layout as ``metric`` (only the guide token's row is read).
        r: tokens to remove, ``0 <= r <= (N - protected) // 2`` (the official code's cap).
        protected: leading tokens that never merge; the first one (CLS) guides the importance.
        x: ``[B, N, C]`` the tokens (only their dtype is used: the weights' dtype).
        size: ``[B, N, 1]`` token sizes, or None (all ones).
        guided: use the guide token's importance; False: importance 0 (plain complete-graph
            matching with size-weighted means).

    Returns:
        ``dest [B, N]`` int64 in ``[0, N - r)``; ``w [B, N, 1]`` the ensemble weights
        ``size · exp(importance − importance of the group's kept token)`` (a token left alone:
        its size); ``size [B, N, 1]`` the sizes to sum (unchanged).
    """
    batch, n = check_metric(metric, r, protected)
    if query.shape[:-2] != metric.shape[:-2] or query.shape[-2] != n:
        raise ConfigError(
            f"crossget: queries {list(query.shape)} do not match the metric {list(metric.shape)}"
        )
    check_dtype(query.dtype, "the queries")
    dtype = metric.dtype if x is None else x.dtype
    device = metric.device
    use_triton = resolve_impl(impl, device, "crossget_rowmax") == "triton"

    sizes = torch.ones(batch, n, 1, device=device, dtype=dtype) if size is None else size
    if r == 0:  # every group a single token: the weights cancel
        return torch.arange(n, device=device).expand(batch, n), sizes, sizes
    m = scoring_metric(concat_heads(metric))
    importance = _importance(m, query, protected, guided)  # [B, N]
    if use_triton and m.dtype == torch.float32:  # fp64 stays PyTorch
        is_src, partner = _select_triton(m, importance, r, protected)
    else:
        is_src, partner = _select_torch(m, importance, r, protected)
    kept_slot = (~is_src).cumsum(-1) - 1  # kept tokens keep their order
    dest = torch.where(is_src, kept_slot.gather(1, partner), kept_slot)

    # Ensemble weights: size · exp(importance), measured from the group's kept token (a constant per
    # group, so the group's softmax is unchanged): a token left alone gets exactly its size, and its
    # value passes the merge unchanged, as in ToMe.
    anchor = torch.where(is_src, partner, torch.arange(n, device=device))
    relative = (importance - importance.gather(1, anchor)).exp().unsqueeze(-1)
    w = (sizes.to(relative.dtype) * relative).to(dtype)
    return dest, w, sizes


def _select_torch(m: Tensor, importance: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor]:
    """The sources ``[B, N]`` bool and every token's most similar non-source ``[B, N]``, with the
    ``N × N`` similarity in memory (the plain-PyTorch reference)."""
    n, device = m.shape[1], m.device
    sim = cosine(m, m)  # [B, N, N]
    # Exactly symmetric: a mutual best pair always ties on its best similarity, and the tie must
    # go to the lower index, not to whichever rounding of the two products came out larger.
    sim = (sim + sim.transpose(-1, -2)) * 0.5
    idx = torch.arange(n, device=device)
    blocked = (idx.view(n, 1) == idx.view(1, n)) | (idx < protected).view(n, 1) | (idx < protected).view(1, n)
    sim = sim.masked_fill(blocked, float("-inf"))

    # Rank by best similarity; each token's adjusted similarity only looks at tokens ranked after it,
    # so two tokens cannot both claim each other as their reason to go.
    rank = descending_rank(sim.amax(-1))  # [B, N]; protected (-inf) rank last
    later = rank.unsqueeze(-2) > rank.unsqueeze(-1)  # [B, i, j]: j ranked after i
    adjusted = sim.masked_fill(~later, float("-inf")).amax(-1)  # [B, N]
    # Official order: ascending (importance − adjusted); the same as descending (adjusted −
    # importance), since IEEE subtraction is antisymmetric. Ties: the lower index first.
    is_src = descending_rank(adjusted - importance) < r  # exactly r, never a protected token

    # A source's destination: its most similar non-source (torch.max takes the first maximum).
    partner = sim.masked_fill(is_src.unsqueeze(-2), float("-inf")).argmax(-1)  # [B, N]
    return is_src, partner


def _select_triton(m: Tensor, importance: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor]:
    """:func:`_select_torch` with the three row maxima in ``torch.ops.tomec.crossget_rowmax`` (the
    similarity recomputed tile by tile, never stored; the same formula and roundings)."""
    inv = inv_norm(m)
    zero = torch.zeros(m.shape[:2], device=m.device, dtype=torch.int64)
    rowmax = torch.ops.tomec.crossget_rowmax
    best, _ = rowmax(m, inv, zero - 1, zero, protected)  # every column
    rank = descending_rank(best)
    adjusted, _ = rowmax(m, inv, rank, rank, protected)  # the columns ranked after the row
    is_src = descending_rank(adjusted - importance) < r
    _, partner = rowmax(m, inv, zero, (~is_src).to(torch.int64), protected)  # the non-sources
    return is_src, partner


@dataclass(frozen=True)
class CrossgetOptions(Options):
    """``guided``: importance guided by the CLS query (False: by the tokens alone)."""

    method = "crossget"
    guided: bool = True

    def __post_init__(self) -> None:
        check_bool("crossget", "guided", self.guided)


def _match(inp: MatchInput, options: CrossgetOptions) -> MatchResult:
    dest, w, sizes = crossget_match(inp.keys, inp.queries, inp.r, inp.protected, x=inp.x, size=inp.size,
                                    guided=options.guided, impl=inp.impl)
    return MatchResult(dest, w, sizes)


# ToMe's cap: the official reducer clamps r to half of the mergeable tokens (the default cap).
register(Method(name="crossget", options=CrossgetOptions, match=_match))
