"""DTEM (Decoupled Token Embedding for Merging, NeurIPS'24): a learned metric for ToMe's matching,
and the continuous relaxation of merging used to train it ("soft merging").

Inference (:func:`dtem_match`): a per-block linear head ``C -> d_m`` maps the tokens entering the
attention projections (after the block's first norm, as the official code feeds its head from the
qkv layer's input) to an embedding; ToMe's bipartite matching runs on that embedding instead of the
keys (:func:`bipartite_match`, unchanged).

Training (:func:`relaxed_topk`, :func:`soft_merge`), following the official code
(movinghoon/DTEM): within the ``n`` tokens still taking part, the non-protected ones split by
position parity into A and B; each A token keeps its ``k2`` best B candidates (cosine); ``r`` rounds
of a softmax over all kept A×B scores (temperature ``tau1·tau2``) each add their mass to the
assignment, then remove the mass each A token received from its scores (``log(1 - p)``); rows are
normalized to at most 1. B tokens absorb the assigned share of A tokens (size-weighted), A tokens
lose that share of their size, nothing leaves the sequence: the merged tokens are re-sorted by size
(descending) and the next block only considers the first ``n - r`` of them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tomec.errors import ConfigError

from .matching import bipartite_match

# The official code floors the remaining mass at fp32's epsilon before its log.
_MASS_FLOOR = float(torch.finfo(torch.float32).eps)


def dtem_metric(attn_in: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The head's embedding: ``[B, N, C] x [d_m, C] (+ [d_m]) -> [B, N, d_m]`` (a plain linear map,
    no norm or activation, as in the official code)."""
    if weight.dim() != 2 or weight.shape[1] != attn_in.shape[-1]:
        raise ConfigError(
            f"dtem: the head's weight is {list(weight.shape)}, but the block's tokens have "
            f"{attn_in.shape[-1]} channels (expected [d_m, {attn_in.shape[-1]}])"
        )
    return F.linear(attn_in, weight, bias)


def dtem_match(
    attn_in: Tensor, weight: Tensor, bias: Optional[Tensor], r: int, protected: int = 0, *,
    impl: str = "torch",
) -> Tensor:
    """DTEM's inference matching: ToMe's bipartite matching on the head's embedding.

    Args:
        attn_in: ``[B, N, C]`` the tokens entering the block's attention projections.
        weight, bias: the block's head, ``[d_m, C]`` and ``[d_m]`` (or None).
        r, protected: as :func:`bipartite_match`.

    Returns:
        ``dest [B, N]`` int64, as :func:`bipartite_match`.
    """
    return bipartite_match(dtem_metric(attn_in, weight, bias), r, protected, impl=impl)


def relaxed_topk(scores: Tensor, r: int, *, k2: int = 3, tau1: float = 0.1, tau2: float = 0.1) -> Tensor:
    """Soft choice of ``r`` A→B merges: ``[B, n_a, n_b]`` scores -> assignment ``[B, n_a, n_b]``.

    Each A row keeps its ``k2`` best candidates (ties: the lower B index); ``r`` rounds of a softmax
    over every kept score of the batch element (scores / tau1 / tau2) add up, and after each round an
    A row's logits drop by ``log(1 - mass it just received)`` (floored at fp32's epsilon). Row sums
    above 1 are scaled down to 1 (the scale is not differentiated, as in the official code).
    """
    batch, n_a, n_b = scores.shape
    out = torch.zeros_like(scores)
    if r == 0 or n_a == 0 or n_b == 0:
        return out
    k2 = min(k2, n_b)
    top, idx = scores.sort(dim=-1, descending=True, stable=True)
    logits = top[..., :k2] / tau1
    idx = idx[..., :k2]
    khot = torch.zeros_like(logits)
    for _ in range(r):  # r rounds, each over all tokens at once
        p = torch.softmax(logits.reshape(batch, n_a * k2) / tau2, dim=-1).view(batch, n_a, k2)
        khot = khot + p
        logits = logits + torch.log(torch.clamp(1 - p.sum(-1, keepdim=True), min=_MASS_FLOOR))
    khot = khot / (torch.clamp(khot.sum(-1, keepdim=True).detach() - 1, min=0.0) + 1)
    return out.scatter_add(-1, idx, khot)


def soft_merge(
    x: Tensor, size: Tensor, metric: Tensor, r: int, n: int, protected: int = 0, *,
    k2: int = 3, tau1: float = 0.1, tau2: float = 0.1, order: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, int]:
    """One block's soft merge for training; the sequence length is unchanged.

    Args:
        x: ``[B, N, C]`` tokens; size: ``[B, N, 1]`` their (soft) sizes.
        metric: ``[B, N, d_m]`` the head's embedding (cosine scores: its norm does not matter).
        r: merges this block (clamped to ``(n - protected) // 2``).
        n: tokens taking part (the first ``n``; the rest are leftovers of earlier merges).
        order: ``[B, n - protected]`` int64, a permutation of the taking-part tokens that decides the
            A/B split (A = its even positions, B = its odd ones); default: ToMe's alternation.

    Returns:
        ``x [B, N, C]``, ``size [B, N, 1]``, and the tokens taking part in the next block ``n - r``.
    """
    r = min(r, max(n - protected, 0) // 2)
    if r <= 0:
        return x, size, n
    w = size[..., 0]
    m = torch.nn.functional.normalize(metric, dim=-1)  # a zero embedding stays finite
    xs, ws, ms = x[:, protected:n], w[:, protected:n], m[:, protected:n]
    if order is not None:
        if order.shape != (x.shape[0], n - protected) or not torch.equal(
            order.sort(-1).values, torch.arange(n - protected, device=order.device).expand_as(order)
        ):
            raise ValueError(
                f"order must hold a permutation of 0..{n - protected - 1} per image "
                f"([{x.shape[0]}, {n - protected}]), got shape {list(order.shape)}"
            )
        xs, ms = (t.gather(1, order.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in (xs, ms))
        ws = ws.gather(1, order)
    xa, xb, wa, wb = xs[:, 0::2], xs[:, 1::2], ws[:, 0::2], ws[:, 1::2]
    scores = ms[:, 0::2] @ ms[:, 1::2].transpose(-1, -2)
    assign = relaxed_topk(scores, r, k2=k2, tau1=tau1, tau2=tau2)  # [B, n_a, n_b]
    moved = assign.transpose(-1, -2) @ wa.unsqueeze(-1)  # [B, n_b, 1]: size B receives
    wb_new = wb + moved[..., 0]
    xb = (wb.unsqueeze(-1) * xb + assign.transpose(-1, -2) @ (wa.unsqueeze(-1) * xa)) / wb_new.unsqueeze(-1)
    kept = 1 - assign.sum(-1)
    # Straight-through clip to [0, 1]: rounding can push a fully assigned row past 1.
    wa = wa * (kept + (kept.clamp(0.0, 1.0) - kept).detach())
    w_mid = torch.cat([wa, wb_new], dim=1)
    x_mid = torch.cat([xa, xb], dim=1)
    by_size = w_mid.sort(dim=-1, descending=True, stable=True).indices
    w_mid = w_mid.gather(1, by_size)
    x_mid = x_mid.gather(1, by_size.unsqueeze(-1).expand_as(x_mid))
    x = torch.cat([x[:, :protected], x_mid, x[:, n:]], dim=1)
    size = torch.cat([size[:, :protected], w_mid.unsqueeze(-1), size[:, n:]], dim=1)
    return x, size, n - r
