"""The destination-map merge and source tracking."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tomec.errors import ConfigError

from .common import check_dtype, register_vjp_autograd, resolve_impl

MERGE_MODES = ("mean", "norm_preserving")


def merge(
    x: Tensor,
    size: Optional[Tensor],
    dest: Tensor,
    n_out: int,
    w: Optional[Tensor] = None,
    *,
    n_dropped: int = 0,
    mode: str = "mean",
    impl: str = "torch",
) -> tuple[Tensor, Tensor]:
    """Apply a destination map: each output token is the weighted mean of its members.

    Args:
        x: ``[B, N, C]`` tokens.
        size: ``[B, N, 1]`` patches per token, or ``None`` for all ones.
        dest: ``[B, N]`` int64 output slot per token in ``[0, n_out)``, ``-1`` for dropped tokens.
            Every slot must have at least one member, and exactly ``n_dropped`` tokens per image
            are ``-1`` (both hold for every matcher in tomec; the shapes below depend on it).
        n_out: number of output tokens.
        w: ``[B, N, 1]`` merge weights; ``None`` means ``size`` (the size-weighted mean).
        n_dropped: tokens per image with ``dest == -1``.
        mode: ``"mean"``, or ``"norm_preserving"`` (ToFu's MLERP: the mean's direction rescaled
            to the largest norm among the members).

    Returns:
        ``x_out [B, n_out, C]`` (weighted means), ``size_out [B, n_out, 1]`` (sums of member sizes).
    """
    check_dtype(x.dtype, "merged tokens")
    if mode not in MERGE_MODES:
        raise ConfigError(f"merge mode={mode!r}; choose one of {MERGE_MODES}")
    batch, n, channels = x.shape
    n_extra = n - n_out - n_dropped
    if n_out < 1 or n_extra < 0:
        raise ConfigError(
            f"cannot merge {n} tokens into {n_out} slots with {n_dropped} dropped "
            f"(needs 1 <= n_out <= N - n_dropped)"
        )
    if resolve_impl(impl, x.device, "merge") == "triton":
        _register_merge_autograd()
        return torch.ops.tomec.merge(x, size, dest, n_out, w, mode)
    if size is None:
        size = x.new_ones(batch, n, 1)
    if w is None:
        w = size
    groups = _Groups(dest, n_out, n_extra)
    parts = torch.cat([x * w, w, size], dim=-1)  # one gather for values, weights and sizes
    out = groups.sum(parts)
    first, extra, onto = groups.first, groups.extra, groups.onto
    x_out = out[..., :channels] / out[..., channels : channels + 1]
    if mode == "norm_preserving":
        norms = x.norm(dim=-1)  # [B, N]
        largest = norms.gather(1, first)
        if n_extra:
            extra_norms = torch.where(onto, norms.gather(1, extra).unsqueeze(1), 0.0)
            largest = torch.maximum(largest, extra_norms.amax(-1))
        scale = largest / x_out.norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)
        x_out = x_out * scale.unsqueeze(-1)
    return x_out, out[..., channels + 1 :]


class _Groups:
    """Each output slot's members, as one gather of its first member plus the few extra members
    (far cheaper than a scatter over all N tokens, and no floating-point atomics: deterministic)."""

    def __init__(self, dest: Tensor, n_out: int, n_extra: int) -> None:
        batch, n = dest.shape
        device = dest.device
        slots = torch.arange(n_out, device=device)
        positions = torch.arange(n, device=device)
        is_member = dest.unsqueeze(1) == slots.view(1, n_out, 1)  # [B, n_out, N]
        self.first = torch.where(is_member, positions.view(1, 1, n), n).amin(-1)  # [B, n_out]
        is_first = self.first.gather(1, dest.clamp_min(0)) == positions.view(1, n)
        is_extra = (dest >= 0) & ~is_first  # [B, N], n_extra per image
        extra_rank = is_extra.cumsum(-1)  # k-th extra has rank k + 1
        ks = torch.arange(n_extra, device=device)
        self.extra = (extra_rank.unsqueeze(1) <= ks.view(1, n_extra, 1)).sum(-1)  # [B, n_extra]
        self.onto = dest.gather(1, self.extra).unsqueeze(1) == slots.view(1, n_out, 1)  # [B, n_out, n_extra]
        self.n_out, self.n_extra = n_out, n_extra

    def sum(self, values: Tensor) -> Tensor:
        """``[B, N, F] -> [B, n_out, F]``: each slot's members summed (dropped tokens left out)."""
        batch, _, f = values.shape
        out = values.gather(1, self.first.unsqueeze(-1).expand(batch, self.n_out, f))
        if self.n_extra:
            extra = values.gather(1, self.extra.unsqueeze(-1).expand(batch, self.n_extra, f))
            out = out + self.onto.to(values.dtype) @ extra
        return out


def merge_attention(probs: Tensor, dest: Tensor, w: Tensor, n_out: int, n_dropped: int = 0) -> Tensor:
    """An attention map merged with its tokens (MCTF's one-step-ahead form).

    Key columns are summed over each output token's members; query rows are the members' weighted
    mean (weights ``w``), so rows still sum to 1.

    Args:
        probs: ``[B, H, N, N]`` attention probabilities; dest: ``[B, N]`` (``-1``: dropped);
        w: ``[B, N, 1]`` merge weights; n_out: output tokens; n_dropped: tokens with ``dest = -1``.

    Returns:
        ``[B, H, n_out, n_out]`` in ``probs``' dtype. Gathers and the few extra members (as
        :func:`merge`), ``O(H · N · n_out)``: no ``[n_out, N]`` membership matmul.
    """
    batch, heads, n, _ = probs.shape
    groups = _Groups(dest, n_out, n - n_out - n_dropped)
    keys_first = probs.permute(0, 3, 1, 2).reshape(batch, n, heads * n)  # [B, key, (H, query)]
    cols = groups.sum(keys_first).reshape(batch, n_out, heads, n).permute(0, 3, 2, 1)  # [B, query, H, n_out]
    w = w.to(probs.dtype)
    rows = groups.sum(cols.reshape(batch, n, heads * n_out) * w)  # [B, n_out, H·n_out]
    rows = rows / groups.sum(w)  # the groups' weighted means
    return rows.reshape(batch, n_out, heads, n_out).transpose(1, 2)


def merge_dense(
    x: Tensor, size: Optional[Tensor], dest: Tensor, n_out: int, w: Optional[Tensor] = None,
    mode: str = "mean",
) -> tuple[Tensor, Tensor]:
    """:func:`merge` written with a one-hot membership matrix ``[B, n_out, N]``.

    Same values as :func:`merge`, up to rounding; ``O(n_out · N)`` memory. It is the gradient formula
    of the Triton merge (its vector-Jacobian product is what the kernel's backward computes) and a
    second, independent spelling of the merge for tests.
    """
    if size is None:
        size = x.new_ones(*x.shape[:2], 1)
    if w is None:
        w = size
    slots = torch.arange(n_out, device=x.device).view(1, n_out, 1)
    member = dest.unsqueeze(1) == slots  # [B, n_out, N]; dropped tokens (-1) belong to no slot
    onehot = member.to(x.dtype)
    x_out = (onehot @ (x * w)) / (onehot @ w)
    if mode == "norm_preserving":
        norms = x.norm(dim=-1).unsqueeze(1)  # [B, 1, N]
        largest = torch.where(member, norms, torch.zeros_like(norms)).amax(-1, keepdim=True)
        x_out = x_out * (largest / x_out.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny))
    return x_out, onehot @ size


def _register_merge_autograd() -> None:
    """Gradients of ``torch.ops.tomec.merge`` with respect to ``x``, ``size`` and ``w``: those of
    :func:`merge_dense`. The destination map is a discrete choice and gets no gradient."""
    register_vjp_autograd(
        "tomec::merge",
        lambda x, size, dest, n_out, w, mode: merge_dense(x, size, dest, n_out, w, mode),
        differentiable=(0, 1, 4),
    )


def compose_source(source: Optional[Tensor], dest: Tensor, *, impl: str = "torch") -> Tensor:
    """Track original tokens through a merge: ``[B, N0]`` slots of the original tokens.

    ``source=None`` means the identity (the first merge); ``-1`` (dropped) stays ``-1``.
    """
    if source is None:
        return dest
    if resolve_impl(impl, dest.device, "compose_source") == "triton":
        return torch.ops.tomec.compose_source(source, dest)
    return torch.where(source >= 0, dest.gather(1, source.clamp_min(0)), -1)


def size_weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Average over tokens counting each token as many patches as it holds: ``[B, N, C] -> [B, C]``."""
    size = size.to(x.dtype)
    return (x * size).sum(1) / size.sum(1)


def size_weighted_pool(x: Tensor, size: Tensor, pool_type: str) -> Tensor:
    """timm's ``"avg"`` / ``"avgmax"`` token pooling with each token counted ``size [B, N, 1]``
    times: ``[B, N, C] -> [B, C]``. A token of size 0 (masked out while training) is left out of
    the max as well as the mean."""
    mean = size_weighted_mean(x, size)
    if pool_type == "avg":
        return mean
    return 0.5 * (x.masked_fill(size == 0, float("-inf")).amax(dim=1) + mean)
