"""DTEM (Decoupled Token Embedding for Merging, NeurIPS'24): a learned metric for ToMe's matching,
the heads' forms, and the continuous relaxation of merging used to train them ("soft merging";
the training loop: :mod:`tomec.train.dtem`).

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

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tomec.errors import ConfigError
from tomec.files import load_state_file
from tomec.ops.bipartite import bipartite_match

from .core import MatchInput, MatchResult, Method, Options, check_int, register

__all__ = [
    "DtemOptions", "DtemWeights", "dtem_match", "dtem_metric", "relaxed_topk", "soft_merge", "load_heads",
    "block_params", "head_out_dim", "init_head", "RANDOM_HEADS_WARNING",
]

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


# --- the learned heads (their training: tomec.train.dtem) -------------------------------------------

HeadsLike = Union[str, Path, Mapping[str, Tensor], nn.ModuleList, "DtemWeights"]

RANDOM_HEADS_WARNING = (
    "dtem: no trained heads given (heads=None): DTEM is ToMe with a random metric (seeded random "
    "heads, seed={seed}); train heads with tomec.train.dtem.train_heads and pass heads="
)


def head_out_dim(channels: int, head_dim: int) -> int:
    """The official head width: the attention head width ``d``, or ``2d`` for ``C >= 1024``."""
    return head_dim if channels < 1024 else 2 * head_dim


@functools.lru_cache(maxsize=256)
def init_head(channels: int, out_dim: int, layer: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A block's untrained head, reproducible: ``nn.Linear``'s default distribution
    (uniform in ±1/sqrt(C)) drawn from a generator seeded by ``(seed, layer)``. Cached: do not
    modify the tensors in place."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    bound = 1.0 / math.sqrt(channels)
    weight = (torch.rand(out_dim, channels, generator=g) * 2 - 1) * bound
    bias = (torch.rand(out_dim, generator=g) * 2 - 1) * bound
    return weight, bias


class DtemWeights:
    """Trained heads in normalized form: one ``(weight [d_m, C], bias [d_m])`` per block (detached
    copies, fp32 or fp64)."""

    def __init__(self, layers: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.layers = tuple((w.detach().clone(), b.detach().clone()) for w, b in layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        w = self.layers[0][0] if self.layers else None
        shape = f"{w.shape[1]} -> {w.shape[0]}" if w is not None else "empty"
        return f"DtemWeights({len(self.layers)} blocks, {shape})"

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for i, (w, b) in enumerate(self.layers):
            out[f"{i}.weight"], out[f"{i}.bias"] = w, b
        return out


def _from_state_dict(state: Mapping[str, Any], where: str) -> DtemWeights:
    blocks: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        index, _, name = str(key).partition(".")
        if not index.isdigit() or name not in ("weight", "bias") or not isinstance(value, Tensor):
            raise ConfigError(
                f"dtem: heads {where} must map '<block>.weight' / '<block>.bias' to tensors "
                f"(an nn.ModuleList state dict), found key {key!r}"
            )
        blocks.setdefault(int(index), {})[name] = value
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ConfigError(f"dtem: heads {where} must cover blocks 0..L-1, found {sorted(blocks)}")
    layers = []
    for i in range(len(blocks)):
        w = blocks[i].get("weight")
        if w is None or w.dim() != 2:
            raise ConfigError(f"dtem: heads {where}: block {i} has no 2-D weight [d_m, C]")
        b = blocks[i].get("bias")
        b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
        if b.shape != (w.shape[0],):
            raise ConfigError(f"dtem: heads {where}: block {i} bias {list(b.shape)} for weight {list(w.shape)}")
        layers.append((w.float() if w.dtype in (torch.float16, torch.bfloat16) else w,
                       b.float() if b.dtype in (torch.float16, torch.bfloat16) else b))
    return DtemWeights(layers)


def load_heads(heads: Optional[HeadsLike]) -> Optional[DtemWeights]:
    """Any accepted form of ``heads=`` as :class:`DtemWeights` (None stays None)."""
    if heads is None or isinstance(heads, DtemWeights):
        return heads
    if isinstance(heads, (str, Path)):
        return _from_state_dict(load_state_file(heads, "dtem: heads"), f"in {heads}")
    if isinstance(heads, nn.ModuleList):
        if not all(isinstance(m, nn.Linear) for m in heads):
            raise ConfigError("dtem: heads as an nn.ModuleList must hold one nn.Linear per block")
        return _from_state_dict(heads.state_dict(), "(nn.ModuleList)")
    if isinstance(heads, Mapping):
        return _from_state_dict(heads, "(state dict)")
    raise ConfigError(
        f"dtem: heads must be a path, a state dict, an nn.ModuleList of nn.Linear or DtemWeights, "
        f"got {type(heads).__name__}"
    )


def block_params(
    heads: Optional[DtemWeights], *, seed: int, dim: Optional[int], layer: int, num_layers: int,
    channels: int, head_dim: int,
) -> dict[str, Tensor]:
    """One block's head ``{"weight": [d_m, C], "bias": [d_m]}``: the trained one, or the seeded
    random init when ``heads`` is None."""
    if heads is None:
        weight, bias = init_head(channels, dim or head_out_dim(channels, head_dim), layer, seed)
        return {"weight": weight, "bias": bias}
    if len(heads) != num_layers:
        raise ConfigError(f"dtem: heads has {len(heads)} blocks, the model {num_layers} attention blocks")
    weight, bias = heads.layers[layer]
    if weight.shape[1] != channels:
        raise ConfigError(
            f"dtem: the head of block {layer} takes {weight.shape[1]} channels, the model's tokens "
            f"have {channels}"
        )
    return {"weight": weight, "bias": bias}


@dataclass(frozen=True)
class DtemOptions(Options):
    """``heads``: the trained heads (a path, a state dict, an ``nn.ModuleList`` of ``nn.Linear``,
    :class:`DtemWeights`; None: seeded random heads); ``seed`` of those; ``dim``: their width
    (None: the official rule, :func:`head_out_dim`)."""

    method = "dtem"
    param_fields = ("heads", "seed", "dim")
    heads: Optional[Any] = None
    seed: int = 0
    dim: Optional[int] = None

    def __post_init__(self) -> None:
        self._set("seed", check_int("dtem", "seed", self.seed))
        self._set("dim", check_int("dtem", "dim", self.dim, minimum=1, optional=True,
                                   kind="a positive int", what=" or None (the head width rule)"))
        heads = load_heads(self.heads)
        if heads is not None and self.dim is not None and self.dim != heads.layers[0][0].shape[0]:
            raise ConfigError(f"dtem: dim={self.dim} but the given heads are {heads.layers[0][0].shape[0]} wide")
        self._set("heads", heads)


def _params(options: DtemOptions, *, layer: int, num_layers: int, channels: int, head_dim: int) -> dict:
    return block_params(options.heads, seed=options.seed, dim=options.dim, layer=layer,
                        num_layers=num_layers, channels=channels, head_dim=head_dim)


def _match(inp: MatchInput, options: DtemOptions) -> MatchResult:
    return MatchResult(dtem_match(inp.attn_in, inp.params["weight"], inp.params["bias"], inp.r, inp.protected,
                                  impl=inp.impl))


def _advise(options: DtemOptions) -> Optional[str]:
    return RANDOM_HEADS_WARNING.format(seed=options.seed) if options.heads is None else None


register(Method(name="dtem", options=DtemOptions, match=_match, params=_params, graph_inputs=("attn_in",),
                advise=_advise))
