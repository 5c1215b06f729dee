"""One timm ViT forward, spelled out, for all code that runs a ViT's blocks itself: the eager reference
(:mod:`tomec.reference`) and the training of the learned parts (DTEM's soft merging, DiffRate's
search, LTMP's thresholds and their calibration, FPET's adapter).

It is timm's ``VisionTransformer`` / ``Block`` / ``Attention`` forward plus what merging needs:

- token sizes: the ``log(size)`` bias on the key axis (proportional attention,
  :func:`tomec.ops.log_size_bias`);
- key weights: a multiplier on each key's exponential (:func:`weighted_softmax`), the form that stays
  differentiable where a weight is 0 (a token masked out, or a size that soft merging emptied);
- the attention map itself, when a caller needs it (importance, the CLS token's attention);
- average pooling that counts each token as many times as its size (or weight).

It keeps what timm's modules do: q/k norm, the attention output norm and gate (a gated ``Attention``
is gated in every caller), attention and projection dropout, LayerScale and drop path, and SDPA
where timm calls it (:func:`attention` without key weights or ``explicit``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..errors import UnsupportedModelError

__all__ = [
    "Attended", "timm_blocks", "vit_blocks", "embed", "qkv", "weighted_softmax", "attention",
    "attention_residual", "mlp_residual", "pool", "head",
]


def _check_blocks(blocks: list[nn.Module], what: str, tail: str) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    for layer, block in enumerate(blocks):
        if not isinstance(block, Block) or not isinstance(block.attn, Attention):
            raise UnsupportedModelError(
                f"block {layer} is {type(block).__name__} with attention "
                f"{type(getattr(block, 'attn', None)).__name__}; {what} supports timm Blocks with "
                f"timm's Attention only{tail}"
            )


def timm_blocks(model: nn.Module, what: str, *, advice: str = "") -> list[nn.Module]:
    """The timm ``Block``s in ``model`` (in order), each with timm's ``Attention``; otherwise an
    :class:`~tomec.errors.UnsupportedModelError` saying that ``what`` needs them (``advice`` appended)."""
    from timm.models.vision_transformer import Block

    tail = f"; {advice}" if advice else ""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} holds no timm Block; {what} supports timm VisionTransformer-style "
            f"models (timm Blocks with timm Attention){tail}"
        )
    _check_blocks(blocks, what, tail)
    return blocks


def vit_blocks(model: nn.Module, what: str) -> list[nn.Module]:
    """``model.blocks`` of a timm ``VisionTransformer``-style model whose embedding (:func:`embed`) and
    head (:func:`head`) the caller runs: it needs ``patch_embed``, ``blocks`` (timm ``Block``s with
    timm ``Attention``) and ``forward_head``."""
    if not all(hasattr(model, a) for a in ("patch_embed", "blocks", "forward_head")):
        raise UnsupportedModelError(
            f"{type(model).__name__}: {what} supports timm VisionTransformer-style models (patch_embed, "
            f"blocks of timm Blocks with timm Attention, forward_head)"
        )
    blocks = list(model.blocks)
    _check_blocks(blocks, what, "")
    return blocks


def embed(model: nn.Module, images: Tensor) -> Tensor:
    """The tokens entering block 0 ``[B, N, C]``: patch embedding, prefix tokens and position
    embedding, patch dropout, pre-norm (timm's ``forward_features`` up to the blocks). timm has no
    public call for the middle step: this is the one place that calls its ``_pos_embed``."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The queries, keys and values ``[B, H, N, d]`` of timm ``Attention`` on ``x [B, N, C]``, q and k
    after the q/k norm (as they enter attention)."""
    batch, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def weighted_softmax(logits: Tensor, weight: Tensor, eps: float = 0.0) -> Tensor:
    """Softmax over the last axis with each entry's exponential multiplied by ``weight``
    (broadcastable): ``softmax(logits + log weight)``, spelled so that it is defined, and
    differentiable, where a weight is 0. ``eps > 0`` adds ``eps / N`` to every share of a row and
    ``eps`` to its sum (DiffRate's guard for a row whose weights are all 0)."""
    e = (logits - logits.amax(-1, keepdim=True)).exp() * weight.to(logits.dtype)
    if eps:
        return (e + eps / logits.shape[-1]) / (e.sum(-1, keepdim=True) + eps)
    return e / e.sum(-1, keepdim=True)


class Attended(NamedTuple):
    """What :func:`attention` returns."""

    out: Tensor  # [B, N, C]: the attention branch, after the output projection (before LayerScale)
    q: Tensor  # [B, H, N, d]: the queries and keys that entered attention (after the q/k norm)
    k: Tensor
    probs: Optional[Tensor]  # [B, H, N, N]: the attention map (before dropout), where it was computed


def attention(
    attn: nn.Module,
    x: Tensor,
    size: Optional[Tensor] = None,
    *,
    key_weight: Optional[Tensor] = None,
    eps: float = 0.0,
    probs: Optional[Tensor] = None,
    explicit: bool = False,
) -> Attended:
    """timm ``Attention.forward`` on ``x [B, N, C]`` (gate, q/k norm, output norm, dropouts included)
    with what merging adds.

    Args:
        size: ``[B, N, 1]``: the ``log(size)`` bias on the key axis, or None (no bias).
        key_weight: ``[B, N]`` (per key) or ``[B, N, N]`` (per query and key): multiplies each key's
            exponential (:func:`weighted_softmax`, with ``eps``); implies ``explicit``.
        probs: ``[B, H, N, N]``: the attention map to apply to the values instead of computing one
            (a merged one-step-ahead map); q and k are still returned.
        explicit: the chain ``softmax(q kᵀ · scale + bias) · v`` spelled out, and the map returned,
            also where timm calls SDPA (``attn.fused_attn``); without it the module's own choice.
    """
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = qkv(attn, x)
    bias = None if size is None else ops.log_size_bias(size, q.dtype)
    weights = None
    if probs is not None:
        out = ops.apply_attention(probs, v)
    elif attn.fused_attn and key_weight is None and not explicit:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        if key_weight is None:
            weights = logits.softmax(dim=-1)
        else:
            w = key_weight[:, None, None, :] if key_weight.dim() == 2 else key_weight[:, None]
            weights = weighted_softmax(logits, w, eps)
        out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return Attended(attn.proj_drop(attn.proj(out)), q, k, weights)


def attention_residual(block: nn.Module, x: Tensor, out: Tensor) -> Tensor:
    """A timm ``Block``'s attention residual: ``x + drop_path1(ls1(out))``."""
    return x + block.drop_path1(block.ls1(out))


def mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
    """A timm ``Block``'s MLP half: ``x + drop_path2(ls2(mlp(norm2(x))))``."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _size_weighted(
    model: nn.Module, x: Tensor, size: Optional[Tensor], pool_type: str, protected: Optional[int]
) -> Optional[Tensor]:
    """The size-weighted token average ``[B, C]`` where it replaces timm's pooling (``"avg"``,
    ``"avgmax"``, no attention pool, sizes given); None where timm's own pooling applies."""
    if size is None or pool_type not in ("avg", "avgmax") or getattr(model, "attn_pool", None) is not None:
        return None
    if getattr(model, "pool_include_prefix", False):
        start = 0
    else:
        start = int(getattr(model, "num_prefix_tokens", 0)) if protected is None else protected
    return ops.size_weighted_pool(x[:, start:], size[:, start:], pool_type)


def pool(
    model: nn.Module, x: Tensor, size: Optional[Tensor] = None, pool_type: Optional[str] = None, *,
    protected: Optional[int] = None,
) -> Tensor:
    """timm ``VisionTransformer.pool`` on ``x [B, N, C]`` with the token average (``"avg"``,
    ``"avgmax"``) counting each token ``size [B, N, 1]`` times (a size, or a size times a mask: a
    weight-0 token is left out); ``protected`` prefix tokens are left out of the average unless the
    model pools them (default: the model's ``num_prefix_tokens``)."""
    from timm.models.vision_transformer import VisionTransformer

    pool_type = getattr(model, "global_pool", "token") if pool_type is None else pool_type
    pooled = _size_weighted(model, x, size, pool_type, protected)
    return VisionTransformer.pool(model, x, pool_type) if pooled is None else pooled


def head(model: nn.Module, x: Tensor, size: Optional[Tensor] = None, *, protected: Optional[int] = None) -> Tensor:
    """The classifier on the last block's tokens ``x [B, N, C]``: the final norm, the pooling of
    :func:`pool` (average pooling weighted by ``size [B, N, 1]``), ``fc_norm``, the head; timm's
    ``forward_head`` wherever its own pooling applies."""
    x = model.norm(x)
    pooled = _size_weighted(model, x, size, getattr(model, "global_pool", "token"), protected)
    if pooled is None:
        return model.forward_head(x)
    return model.head(model.head_drop(model.fc_norm(pooled)))
