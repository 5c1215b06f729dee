"""Matchers: each turns similarity features into a destination map ``dest [B, N]``."""

from __future__ import annotations

import torch
from torch import Tensor

from tomec.errors import ConfigError

from .common import check_dtype, descending_rank, inv_norm, resolve_impl

def key_metric(k: Tensor) -> Tensor:
    """ToMe's similarity metric: the keys averaged over heads, ``[B, H, N, d] -> [B, N, d]``."""
    return k.mean(1)


def bipartite_match(metric: Tensor, r: int, protected: int = 0, *, impl: str = "torch") -> Tensor:
    """ToMe's bipartite soft matching, as a destination map.

    Tokens split by position parity (A = even, B = odd, protected ones included); each A token's best
    B partner by cosine similarity (ties: the lowest B index); the ``r`` A tokens with the highest
    best score (ties: the lowest A index) merge into their partners. Output order: the protected
    tokens, the unmerged non-protected A tokens by position, then the non-protected B tokens.

    Args:
        metric: ``[B, N, d]`` similarity features, or the attention keys ``[B, H, N, d]``, summed
            over heads (the cosine is scale-invariant: the same matches as ToMe's head mean).
        r: tokens to remove, ``0 <= r <= (N - protected) // 2``.
        protected: leading tokens that never merge.

    Returns:
        ``dest``: ``[B, N]`` int64 in ``[0, N - r)``.
    """
    check_dtype(metric.dtype, "the merge metric")
    if metric.dim() not in (3, 4):
        raise ConfigError(f"metric must be [B, N, d] or keys [B, H, N, d], got {list(metric.shape)}")
    batch, n = metric.shape[0], metric.shape[-2]
    if not 0 <= protected <= n:
        raise ConfigError(f"protected={protected} is outside [0, {n}] for {n} tokens")
    cap = (n - protected) // 2
    if not 0 <= r <= cap:
        raise ConfigError(f"r={r} is outside [0, {cap}] for {n} tokens with {protected} protected")
    if resolve_impl(impl, metric.device) == "triton":
        return torch.ops.tomec.tome_match(metric, r, protected)
    device = metric.device
    # Scores decide discrete matches: compute them in fp32 at least, whatever the activations.
    wide = torch.float64 if metric.dtype == torch.float64 else torch.float32
    metric = metric.sum(1, dtype=wide) if metric.dim() == 4 else metric.to(wide)
    a, b = metric[:, ::2], metric[:, 1::2]
    n_a, n_b = a.shape[1], b.shape[1]
    prot_a, prot_b = (protected + 1) // 2, protected // 2
    ia = torch.arange(n_a, device=device)
    ib = torch.arange(n_b, device=device)

    # cosine scores as (a · b) / ‖a‖ / ‖b‖, the formula the Triton kernel uses too
    scores = (a @ b.transpose(-1, -2)) * inv_norm(a).unsqueeze(-1) * inv_norm(b).unsqueeze(-2)
    blocked = (ia < prot_a).view(n_a, 1) | (ib < prot_b).view(1, n_b)
    scores = scores.masked_fill(blocked, float("-inf"))
    best, partner = scores.max(dim=-1)  # [B, n_a]; torch.max returns the first maximal index
    is_src = descending_rank(best) < r

    # Output slots: protected tokens keep their positions, unmerged A tokens follow by position,
    # then the non-protected B tokens; a source takes its partner's slot.
    n_unmerged_a = n_a - prot_a - r
    slot_b = torch.where(ib < prot_b, 2 * ib + 1, protected + n_unmerged_a + ib - prot_b)
    kept_a = ~is_src & (ia >= prot_a)
    slot_kept_a = protected - 1 + kept_a.cumsum(-1)
    slot_a = torch.where(
        ia < prot_a, 2 * ia, torch.where(is_src, slot_b[partner], slot_kept_a)
    )
    slot_b = slot_b.expand(batch, n_b)
    paired = torch.stack([slot_a[:, :n_b], slot_b], dim=-1).reshape(batch, 2 * n_b)
    return torch.cat([paired, slot_a[:, n_b:]], dim=1) if n_a > n_b else paired
