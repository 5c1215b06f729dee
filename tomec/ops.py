"""The op layer: token-merging steps as functions of tensors.

Every method ends in the same representation, the *destination map*: ``dest[b, i]`` is the output slot
of token ``i`` (``-1``: dropped). :func:`merge` applies any destination map; matchers such as
:func:`bipartite_match` produce one. Each op takes ``impl=``: ``"torch"`` is the plain-PyTorch
semantic reference (used on CPU, and traced by Inductor there); ``"triton"`` runs the fused kernels of
``tomec.kernels`` (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``"auto"`` picks Triton for CUDA
tensors. All ops are free of Python loops over tokens, host synchronization and data-dependent
shapes, so Dynamo/Inductor trace them whole.

Shapes: ``B`` batch, ``N`` tokens in, ``N_out`` tokens out, ``C`` channels, ``H`` heads, ``d`` head
width, ``N0`` tokens entering the first block.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from torch import Tensor

from .errors import ConfigError, UnsupportedDtypeError

log = logging.getLogger("tomec")

__all__ = [
    "SUPPORTED_DTYPES",
    "check_dtype",
    "resolve_impl",
    "key_metric",
    "bipartite_match",
    "merge",
    "compose_source",
    "log_size_bias",
    "combine_masks",
    "attention",
    "attention_extra_dim",
    "attention_flex",
    "size_weighted_mean",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IMPLS = ("torch", "triton", "auto")
MERGE_MODES = ("mean", "norm_preserving")


def check_dtype(dtype: torch.dtype, where: str = "activations") -> None:
    """Raise :class:`UnsupportedDtypeError` unless ``dtype`` is one tomec has ops for."""
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise UnsupportedDtypeError(
            f"{where} are {str(dtype).replace('torch.', '')}; tomec supports {names}"
        )


_warned_fallback = False


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``.

    ``"auto"`` takes Triton for CUDA tensors when the kernels load, else PyTorch (with a one-time
    warning when CUDA tensors fall back). ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``.
    """
    global _warned_fallback
    if impl not in IMPLS:
        raise ConfigError(f"impl={impl!r} is not available; choose one of {IMPLS}")
    if impl == "torch":
        return impl
    from tomec import kernels

    reason = kernels.unavailable_reason()
    if impl == "auto":
        if device.type != "cuda":
            return "torch"
        if reason is None:
            kernels.load()
            return "triton"
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"tomec: using the PyTorch ops on CUDA: {reason}", stacklevel=3)
            log.warning("tomec: using the PyTorch ops on CUDA: %s", reason)
        return "torch"
    if reason is not None:
        raise ConfigError(f"impl='triton' is not available: {reason}")
    if device.type == "cpu" and not kernels.interpreting():
        raise ConfigError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    kernels.load()
    return "triton"


def key_metric(k: Tensor) -> Tensor:
    """ToMe's similarity metric: the keys averaged over heads, ``[B, H, N, d] -> [B, N, d]``."""
    return k.mean(1)


def _inv_norm(t: Tensor) -> Tensor:
    # The clamp only keeps an all-zero vector from turning into NaN.
    return 1.0 / t.norm(dim=-1).clamp_min(torch.finfo(t.dtype).tiny)


def _descending_rank(score: Tensor) -> Tensor:
    """Position of each entry in a stable descending sort of the last axis (ties: lower index first).

    ``[B, n] -> [B, n]`` int64. Pairwise counting instead of ``sort`` + inverse permutation: one fused
    reduction under Inductor, exact, and no tie-order freedom.
    """
    n = score.shape[-1]
    idx = torch.arange(n, device=score.device)
    other, me = score.unsqueeze(-2), score.unsqueeze(-1)  # [B, 1, n] (j), [B, n, 1] (i)
    before = (other > me) | ((other == me) & (idx.view(1, 1, n) < idx.view(1, n, 1)))
    return before.sum(-1)


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
    scores = (a @ b.transpose(-1, -2)) * _inv_norm(a).unsqueeze(-1) * _inv_norm(b).unsqueeze(-2)
    blocked = (ia < prot_a).view(n_a, 1) | (ib < prot_b).view(1, n_b)
    scores = scores.masked_fill(blocked, float("-inf"))
    best, partner = scores.max(dim=-1)  # [B, n_a]; torch.max returns the first maximal index
    is_src = _descending_rank(best) < r

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
    if resolve_impl(impl, x.device) == "triton":
        return torch.ops.tomec.merge(x, size, dest, n_out, w, MERGE_MODES.index(mode))
    if size is None:
        size = x.new_ones(batch, n, 1)
    if w is None:
        w = size
    device = x.device
    slots = torch.arange(n_out, device=device)
    positions = torch.arange(n, device=device)

    # Gather one member per slot (its first) and fold in only the few extra members: far cheaper
    # than a scatter over all N tokens, and no floating-point atomics, so the result is deterministic.
    is_member = dest.unsqueeze(1) == slots.view(1, n_out, 1)  # [B, n_out, N]
    first = torch.where(is_member, positions.view(1, 1, n), n).amin(-1)  # [B, n_out]
    is_first = first.gather(1, dest.clamp_min(0)) == positions.view(1, n)
    is_extra = (dest >= 0) & ~is_first  # [B, N], n_extra per image
    extra_rank = is_extra.cumsum(-1)  # k-th extra has rank k + 1
    ks = torch.arange(n_extra, device=device)
    extra = (extra_rank.unsqueeze(1) <= ks.view(1, n_extra, 1)).sum(-1)  # [B, n_extra] positions

    xw = x * w
    parts = torch.cat([xw, w, size], dim=-1)  # one gather for values, weights and sizes
    out = parts.gather(1, first.unsqueeze(-1).expand(batch, n_out, channels + 2))
    if n_extra:
        extra_parts = parts.gather(1, extra.unsqueeze(-1).expand(batch, n_extra, channels + 2))
        onto = dest.gather(1, extra).unsqueeze(1) == slots.view(1, n_out, 1)  # [B, n_out, n_extra]
        out = out + onto.to(x.dtype) @ extra_parts  # [B, n_extra, C + 2]
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


def compose_source(source: Optional[Tensor], dest: Tensor, *, impl: str = "torch") -> Tensor:
    """Track original tokens through a merge: ``[B, N0]`` slots of the original tokens.

    ``source=None`` means the identity (the first merge); ``-1`` (dropped) stays ``-1``.
    """
    if source is None:
        return dest
    if resolve_impl(impl, dest.device) == "triton":
        return torch.ops.tomec.compose_source(source, dest)
    return torch.where(source >= 0, dest.gather(1, source.clamp_min(0)), -1)


def log_size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention bias ``log(size)`` on the key axis: ``[B, N, 1] -> [B, 1, 1, N]``."""
    return size.log().to(dtype).squeeze(-1)[:, None, None, :]


def combine_masks(mask: Tensor, bias: Tensor) -> Tensor:
    """An existing SDPA ``attn_mask`` (bool: True attends; or additive) plus the ``log(size)`` bias."""
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return mask + bias


def attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None
) -> Tensor:
    """Attention as the explicit chain ``softmax(q kᵀ · scale + bias) v``; ``[B, H, N, d]`` in and out.

    On CPU this beats SDPA with a float mask at the token counts of merged layers.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v


def attention_extra_dim(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: Optional[float] = None
) -> Tensor:
    """SDPA without a mask: ``log(size)`` rides in an extra head dimension so flash kernels apply.

    q gets a column of ``1/scale``, k the bias, both (and v) zero-padded to a multiple of 8:
    ``(q'·k')·scale = q·k·scale + log size``. ``bias``: ``[B, 1, 1, N]``; tensors ``[B, H, N, d]``.
    """
    import torch.nn.functional as F

    d = q.shape[-1]
    if scale is None:
        scale = d**-0.5
    pad = -(d + 1) % 8
    batch, heads, n, _ = k.shape
    q2 = torch.cat([q, torch.full_like(q[..., :1], 1.0 / scale), q.new_zeros(*q.shape[:-1], pad)], -1)
    column = bias.reshape(batch, 1, n, 1).expand(batch, heads, n, 1).to(k.dtype)
    k2 = torch.cat([k, column, k.new_zeros(batch, heads, n, pad)], -1)
    v2 = torch.cat([v, v.new_zeros(*v.shape[:-1], 1 + pad)], -1)
    return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :d]


def attention_flex(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: Optional[float] = None
) -> Tensor:
    """FlexAttention with ``log(size)`` as a ``score_mod`` (compiled into one fused kernel by
    Inductor). ``bias``: ``[B, 1, 1, N]``; tensors ``[B, H, N, d]``."""
    from torch.nn.attention.flex_attention import flex_attention

    log_size = bias.reshape(bias.shape[0], bias.shape[-1])

    def add_log_size(score, b, h, q_idx, kv_idx):
        return score + log_size[b, kv_idx]

    return flex_attention(q, k, v, score_mod=add_log_size, scale=scale)


def size_weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Average over tokens counting each token as many patches as it holds: ``[B, N, C] -> [B, C]``."""
    size = size.to(x.dtype)
    return (x * size).sum(1) / size.sum(1)
