"""The A/B split the bipartite matchers share: scores in fp32, cosine, protected tokens, best partner.

Tokens split by position parity (A = even, B = odd); protected tokens (the leading ``P``) sit on
both sides and are never matched. :func:`bipartite_match` is the full rule (the ``r`` A tokens
with the best partners merge into them), which several methods run on their own metric.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tomec.errors import ConfigError

from .common import check_dtype, descending_rank, inv_norm, resolve_impl

__all__ = [
    "key_metric", "scoring_metric", "cosine", "check_protected", "check_metric", "ab_blocked",
    "best_partner", "interleave", "bipartite_match",
]


def key_metric(k: Tensor) -> Tensor:
    """The keys averaged over heads, ``[B, H, N, d] -> [B, N, d]`` (ToMe's similarity metric), in fp32
    at least (fp64 stays fp64): the metric decides discrete matches, as :func:`scoring_metric`."""
    return k.mean(1, dtype=torch.float64 if k.dtype == torch.float64 else torch.float32)


def scoring_metric(metric: Tensor) -> Tensor:
    """``[B, N, d]`` in fp32 (fp64 stays fp64): keys ``[B, H, N, d]`` are summed over heads.

    Scores decide discrete matches: they are computed in fp32 at least, whatever the activations.
    """
    wide = torch.float64 if metric.dtype == torch.float64 else torch.float32
    return metric.sum(1, dtype=wide) if metric.dim() == 4 else metric.to(wide)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """``[B, n, d] × [B, m, d] -> [B, n, m]`` as ``(a · b) / ‖a‖ / ‖b‖`` (the kernels' formula)."""
    return (a @ b.transpose(-1, -2)) * inv_norm(a).unsqueeze(-1) * inv_norm(b).unsqueeze(-2)


def check_protected(n: int, protected: int) -> None:
    """The protected tokens must be among the ``n`` tokens."""
    if not 0 <= protected <= n:
        raise ConfigError(f"protected={protected} is outside [0, {n}] for {n} tokens")


def check_metric(metric: Tensor, r: int, protected: int) -> tuple[int, int]:
    """A ``[B, N, d]`` metric or ``[B, H, N, d]`` keys, with ``0 <= r <= (N - P) // 2``; ``(B, N)``."""
    check_dtype(metric.dtype, "the merge metric")
    if metric.dim() not in (3, 4):
        raise ConfigError(f"metric must be [B, N, d] or keys [B, H, N, d], got {list(metric.shape)}")
    batch, n = metric.shape[0], metric.shape[-2]
    check_protected(n, protected)
    cap = (n - protected) // 2
    if not 0 <= r <= cap:
        raise ConfigError(f"r={r} is outside [0, {cap}] for {n} tokens with {protected} protected")
    return batch, n


def ab_blocked(n_a: int, n_b: int, protected: int, device: torch.device) -> Tensor:
    """``[n_a, n_b]`` bool: pairs with a protected A or B token (never matched)."""
    ia = torch.arange(n_a, device=device)
    ib = torch.arange(n_b, device=device)
    return (ia < (protected + 1) // 2).view(n_a, 1) | (ib < protected // 2).view(1, n_b)


def best_partner(metric: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    """Each A token's best B partner: ``(best [B, ⌈N/2⌉], partner [B, ⌈N/2⌉])``.

    Cosine on :func:`scoring_metric` of ``metric`` (``[B, N, d]`` or keys ``[B, H, N, d]``);
    protected rows and columns score ``-inf``; ties go to the lowest B index.
    """
    m = scoring_metric(metric)
    a, b = m[:, ::2], m[:, 1::2]
    if b.shape[1] == 0:  # a single token: nothing to match
        return a.new_full(a.shape[:2], float("-inf")), torch.zeros(a.shape[:2], dtype=torch.int64, device=m.device)
    blocked = ab_blocked(a.shape[1], b.shape[1], protected, m.device)
    return cosine(a, b).masked_fill(blocked, float("-inf")).max(dim=-1)


def interleave(even: Tensor, odd: Tensor) -> Tensor:
    """``[B, ⌈n/2⌉]`` and ``[B, ⌊n/2⌋]`` -> ``[B, n]`` with ``even`` at even positions."""
    batch, n_odd = odd.shape
    paired = torch.stack([even[:, :n_odd], odd], dim=-1).reshape(batch, 2 * n_odd)
    return torch.cat([paired, even[:, n_odd:]], dim=1) if even.shape[1] > n_odd else paired


def bipartite_match(
    metric: Tensor, r: int, protected: int = 0, *, drop_sources: bool = False, impl: str = "torch"
) -> Tensor:
    """Bipartite soft matching (ToMe's rule), as a destination map.

    Each A token's best B partner by cosine similarity (ties: the lowest B index); the ``r`` A tokens
    with the highest best score (ties: the lowest A index) merge into their partners. Output order:
    the protected tokens, the unmerged non-protected A tokens by position, then the non-protected B
    tokens.

    Args:
        metric: ``[B, N, d]`` similarity features, or the attention keys ``[B, H, N, d]``, summed
            over heads (the cosine is scale-invariant: the same matches as the head mean).
        r: tokens to remove, ``0 <= r <= (N - protected) // 2``.
        protected: leading tokens that never merge.
        drop_sources: the ``r`` sources are dropped (``dest = -1``) instead of merged (pruning); the
            other slots stay the same.

    Returns:
        ``dest``: ``[B, N]`` int64 in ``[0, N - r)`` (or ``-1``).
    """
    batch, n = check_metric(metric, r, protected)
    if resolve_impl(impl, metric.device, "bipartite_match") == "triton":
        return torch.ops.tomec.bipartite_match(metric, r, protected, drop_sources)
    device = metric.device
    n_a, n_b = (n + 1) // 2, n // 2
    prot_a, prot_b = (protected + 1) // 2, protected // 2
    ia = torch.arange(n_a, device=device)
    ib = torch.arange(n_b, device=device)
    best, partner = best_partner(metric, protected)  # [B, n_a]
    is_src = descending_rank(best) < r

    # Output slots: protected tokens keep their positions, unmerged A tokens follow by position,
    # then the non-protected B tokens; a source takes its partner's slot.
    n_unmerged_a = n_a - prot_a - r
    slot_b = torch.where(ib < prot_b, 2 * ib + 1, protected + n_unmerged_a + ib - prot_b)
    kept_a = ~is_src & (ia >= prot_a)
    slot_kept_a = protected - 1 + kept_a.cumsum(-1)
    source_slot = torch.full_like(partner, -1) if drop_sources else slot_b[partner]
    slot_a = torch.where(ia < prot_a, 2 * ia, torch.where(is_src, source_slot, slot_kept_a))
    return interleave(slot_a, slot_b.expand(batch, n_b))
