"""Matchers: each turns similarity features into a destination map ``dest [B, N]``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tomec.errors import ConfigError

from .common import check_dtype, descending_rank, inv_norm, resolve_impl


def key_metric(k: Tensor) -> Tensor:
    """ToMe's similarity metric: the keys averaged over heads, ``[B, H, N, d] -> [B, N, d]``."""
    return k.mean(1)


def _scoring_metric(metric: Tensor) -> Tensor:
    """``[B, N, d]`` in fp32 (fp64 stays fp64): keys ``[B, H, N, d]`` are summed over heads.

    Scores decide discrete matches: they are computed in fp32 at least, whatever the activations.
    """
    wide = torch.float64 if metric.dtype == torch.float64 else torch.float32
    return metric.sum(1, dtype=wide) if metric.dim() == 4 else metric.to(wide)


def _check_metric(metric: Tensor, r: int, protected: int, cap_of: str = "half") -> tuple[int, int]:
    check_dtype(metric.dtype, "the merge metric")
    if metric.dim() not in (3, 4):
        raise ConfigError(f"metric must be [B, N, d] or keys [B, H, N, d], got {list(metric.shape)}")
    batch, n = metric.shape[0], metric.shape[-2]
    if not 0 <= protected <= n:
        raise ConfigError(f"protected={protected} is outside [0, {n}] for {n} tokens")
    cap = (n - protected) // 2
    if not 0 <= r <= cap:
        raise ConfigError(f"r={r} is outside [0, {cap}] for {n} tokens with {protected} protected")
    return batch, n


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """``[B, n, d] × [B, m, d] -> [B, n, m]`` as ``(a · b) / ‖a‖ / ‖b‖`` (the kernels' formula)."""
    return (a @ b.transpose(-1, -2)) * inv_norm(a).unsqueeze(-1) * inv_norm(b).unsqueeze(-2)


def bipartite_match(
    metric: Tensor, r: int, protected: int = 0, *, drop_sources: bool = False, impl: str = "torch"
) -> Tensor:
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
        drop_sources: the ``r`` sources are dropped (``dest = -1``) instead of merged (ToFu's
            pruning); the other slots stay the same.

    Returns:
        ``dest``: ``[B, N]`` int64 in ``[0, N - r)`` (or ``-1``).
    """
    batch, n = _check_metric(metric, r, protected)
    if resolve_impl(impl, metric.device, "tome_match") == "triton":
        return torch.ops.tomec.tome_match(metric, r, protected, drop_sources)
    device = metric.device
    metric = _scoring_metric(metric)
    a, b = metric[:, ::2], metric[:, 1::2]
    n_a, n_b = a.shape[1], b.shape[1]
    prot_a, prot_b = (protected + 1) // 2, protected // 2
    ia = torch.arange(n_a, device=device)
    ib = torch.arange(n_b, device=device)

    scores = _cosine(a, b)
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
    source_slot = torch.full_like(partner, -1) if drop_sources else slot_b[partner]
    slot_a = torch.where(ia < prot_a, 2 * ia, torch.where(is_src, source_slot, slot_kept_a))
    slot_b = slot_b.expand(batch, n_b)
    paired = torch.stack([slot_a[:, :n_b], slot_b], dim=-1).reshape(batch, 2 * n_b)
    return torch.cat([paired, slot_a[:, n_b:]], dim=1) if n_a > n_b else paired


def _interleave(even: Tensor, odd: Tensor) -> Tensor:
    """``[B, ⌈n/2⌉]`` and ``[B, ⌊n/2⌋]`` -> ``[B, n]`` with ``even`` at even positions."""
    batch, n_odd = odd.shape
    paired = torch.stack([even[:, :n_odd], odd], dim=-1).reshape(batch, 2 * n_odd)
    return torch.cat([paired, even[:, n_odd:]], dim=1) if even.shape[1] > n_odd else paired


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
    batch, n = _check_metric(metric, r, protected)
    device = metric.device
    if r == 0:
        return torch.arange(n, device=device).expand(batch, n)
    if resolve_impl(impl, device, "pitome_match") == "triton":
        return torch.ops.tomec.pitome_match(metric, r, protected, float(margin), bool(bsm))
    m = _scoring_metric(metric)[:, protected:]
    t = n - protected
    sim = _cosine(m, m)  # [B, T, T]
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
        slot_at = _interleave(slot_a, slot_b.expand(batch, n_b))
    else:
        side_a, side_b = order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2]
        partner = _gather_rows_cols(sim, side_a, side_b).argmax(dim=-1)
        slot_b = protected + (t - 2 * r) + torch.arange(r, device=device)
        kept = protected + torch.arange(t - 2 * r, device=device)
        slot_at = torch.cat(
            [_interleave(slot_b[partner], slot_b.expand(batch, r)), kept.expand(batch, t - 2 * r)], 1
        )
    tail = slot_at.gather(1, rank)  # token i sits at place rank[i]
    head = torch.arange(protected, device=device).expand(batch, protected)
    return torch.cat([head, tail], dim=1)


def diffrate_match(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    size: Optional[Tensor],
    r: int,
    protected: int,
    *,
    n_dropped: int = 0,
    scale: Optional[float] = None,
    prop_attn: bool = True,
    impl: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    """DiffRate's prune-then-merge (METHODS.md, DiffRate; OpenGVLab/DiffRate's merge weighting).

    Importance of each token is the CLS query's attention to it, averaged over heads (one ``1 × N``
    softmax per head, with the ``log(size)`` bias under ``prop_attn``, as the block's attention). Non-protected tokens are
    sorted by importance (descending, ties to the lower index); the last ``n_dropped`` are pruned,
    and the next least important ``r - n_dropped`` merge into their most cosine-similar token (on
    ``x``) among the ``T - r`` most important ones. As in the official code a merged token is the
    plain mean of its members (``w`` = 1) and its size is ``size_dst + Σ size_src · sim`` with no
    clamp, as the official evaluation path (its search/training branch clamps each term at 1,
    which with ``sim <= 1`` undoes the scaling; ``tomec.diffrate_search`` keeps that clamp). One
    guard the original lacks: a source with ``sim < 0`` adds 0, never a negative size (which
    could make a merged size <= 0 and its ``log`` NaN under proportional attention).

    Args:
        x: ``[B, N, C]`` the block's tokens; q, k: ``[B, H, N, d]``; size: ``[B, N, 1]`` or None
            (all ones). scale: the attention's logit scale (``d ** -0.5`` when None).
        r: tokens removed (pruned plus merged); protected: leading tokens (the first is the CLS).

    Returns:
        ``dest [B, N]`` (``-1`` for pruned), ``w [B, N, 1]`` merge weights, ``size [B, N, 1]`` the
        sizes to sum (sources scaled by their similarity).
    """
    check_dtype(x.dtype, "merged tokens")
    batch, n, _ = x.shape
    if protected < 1:
        raise ConfigError("DiffRate ranks tokens by the CLS token's attention: it needs protect >= 1")
    t = n - protected
    if not 0 <= n_dropped <= r <= t - 1:
        raise ConfigError(
            f"DiffRate: r={r} (n_dropped={n_dropped}) must satisfy 0 <= n_dropped <= r <= {t - 1} "
            f"for {n} tokens with {protected} protected"
        )
    resolve_impl(impl, x.device)  # validates; the importance and matching stay PyTorch (fused by Inductor)
    device = x.device
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = (q[:, :, :1].to(wide) * scale) @ k.to(wide).transpose(-1, -2)  # [B, H, 1, N]
    if prop_attn and size is not None:
        logits = logits + size.to(wide).log().squeeze(-1)[:, None, None, :]
    importance = logits.softmax(dim=-1).mean(dim=1)[:, 0, protected:]  # [B, T]
    rank = descending_rank(importance)
    order = rank.argsort(dim=-1)
    n_keep, n_src = t - r, r - n_dropped
    xs = x[:, protected:].to(wide)
    pick = lambda idx: xs.gather(1, idx.unsqueeze(-1).expand(batch, idx.shape[1], xs.shape[-1]))  # noqa: E731
    best, partner = _cosine(pick(order[:, n_keep : n_keep + n_src]), pick(order[:, :n_keep])).max(-1)
    slot_at = torch.cat(
        [
            protected + torch.arange(n_keep, device=device).expand(batch, n_keep),
            protected + partner,
            torch.full((batch, n_dropped), -1, device=device, dtype=torch.int64),
        ],
        dim=1,
    )
    similarity_at = torch.cat(
        [torch.ones(batch, n_keep, device=device, dtype=wide), best,
         torch.ones(batch, n_dropped, device=device, dtype=wide)], dim=1
    )
    head = torch.arange(protected, device=device).expand(batch, protected)
    dest = torch.cat([head, slot_at.gather(1, rank)], dim=1)
    scale_size = torch.cat(
        [torch.ones(batch, protected, device=device, dtype=wide), similarity_at.gather(1, rank)], 1
    )
    sizes = x.new_ones(batch, n, 1) if size is None else size
    return dest, x.new_ones(batch, n, 1), (sizes * scale_size.clamp_min(0).unsqueeze(-1)).to(x.dtype)
