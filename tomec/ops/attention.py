"""Proportional attention (the ``log(size)`` bias and the ways to feed it to attention), and the
attention each token receives (MCTF's informativeness, LTMP's importance)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tomec.errors import ConfigError

from .common import check_dtype, register_vjp_autograd, resolve_impl


def log_size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention bias ``log(size)`` on the key axis: ``[B, N, 1] -> [B, 1, 1, N]``, in
    ``dtype`` (give the query's: SDPA masks are built in the query's dtype)."""
    return size.log().to(dtype).squeeze(-1)[:, None, None, :]


def combine_masks(mask: Tensor, bias: Tensor) -> Tensor:
    """An existing SDPA ``attn_mask`` (bool: True attends; or additive) plus the ``log(size)`` bias,
    in the bias's dtype (the query's: cuDNN's SDPA has been reported to misread an fp32 mask beside
    fp16/bf16 queries)."""
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return (mask + bias).to(bias.dtype)


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


def attention_received(
    q: Tensor,
    k: Tensor,
    size: Optional[Tensor] = None,
    scale: Optional[float] = None,
    prop_attn: bool = True,
    *,
    impl: str = "torch",
) -> Tensor:
    """Attention each token receives: the column mean of the attention map over heads and queries.

    ``softmax(q kᵀ · scale + log size)`` (the ``log(size)`` bias on the key axis only under
    ``prop_attn`` with sizes, as the block's own attention), averaged over heads and queries; each
    row is normalised by its log-sum-exp, which is all a kernel needs to avoid storing the map.

    Args:
        q, k: ``[B, H, N, d]``; size: ``[B, N, 1]`` or None (all ones); scale: the logit scale
            (``d ** -0.5`` when None).

    Returns:
        ``[B, N]`` in fp32 (fp64 stays fp64); each image's entries sum to 1.
    """
    check_dtype(q.dtype, "queries")
    if q.dim() != 4 or k.shape != q.shape:
        raise ConfigError(f"q and k must be [B, H, N, d] of one shape, got {list(q.shape)}, {list(k.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    bias = size if (prop_attn and size is not None) else None
    # fp64 stays on the PyTorch path: the kernel accumulates in fp32
    if resolve_impl(impl, q.device, "attention_received") == "triton" and q.dtype != torch.float64:
        register_vjp_autograd("tomec::attention_received", _attention_received, differentiable=(0, 1, 2))
        return torch.ops.tomec.attention_received(q, k, bias, float(scale))
    return _attention_received(q, k, bias, scale)


def attention_probs(q: Tensor, k: Tensor, size: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """The attention map ``softmax(q kᵀ · scale + log size)`` ``[B, H, N, N]`` (``size``: the
    log-size bias's sizes ``[B, N, 1]``, or None), in fp32 (fp64 stays fp64), each row normalised
    by its log-sum-exp."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.to(wide) * scale) @ k.to(wide).transpose(-1, -2)  # [B, H, N, N]
    if size is not None:
        logits = logits + log_size_bias(size.to(wide), wide)
    return (logits - logits.logsumexp(dim=-1, keepdim=True)).exp()


def apply_attention(probs: Tensor, v: Tensor) -> Tensor:
    """``probs [B, H, N, N] @ v [B, H, N, d]`` in the values' dtype (a given attention map, such as
    MCTF's merged one-step-ahead map, in place of the attention)."""
    return probs.to(v.dtype) @ v


def _attention_received(q: Tensor, k: Tensor, size: Optional[Tensor], scale: float) -> Tensor:
    """The plain-PyTorch attention received (``size``: the log-size bias's sizes, or None); also
    the Triton kernel's gradient formula."""
    return attention_probs(q, k, size, scale).mean(dim=(1, 2))
