"""FPET (Faster Parameter-Efficient Tuning, CVPR'25): checkerboard matching on the patch grid."""

from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from tomec.errors import ConfigError

from tomec.ops.common import check_dtype, descending_rank, resolve_impl
from tomec.files import load_state_file
from tomec.ops.bipartite import check_protected, cosine, key_metric, scoring_metric

from .core import MatchInput, MatchResult, Method, Options, check_int, register

__all__ = [
    "FpetOptions", "FpetWeights", "fpet_match", "fpet_grid", "fpet_sides", "fpet_cap", "fpet_metric", "binarize",
    "load_adapter", "check_adapter", "BINARY_LEVEL", "NO_ADAPTER_WARNING",
]

AdapterLike = Union[str, Path, Mapping[str, Tensor], nn.Module]


def fpet_metric(keys: Tensor, down: Optional[Tensor] = None, up: Optional[Tensor] = None) -> Tensor:
    """FPET's merge metric: the head-mean keys ``k̄`` plus the refinement adapter's output,
    ``k̄ + relu(k̄ · downᵀ) · upᵀ`` (the official adapter at the reduction block; its 1-bit weights
    already in effective form, see :mod:`tomec.train.fpet`), ``k̄`` detached as there.

    Args:
        keys: ``[B, H, N, d]`` (or a ready ``[B, N, d]`` head mean).
        down, up: ``[h, d]`` and ``[d, h]`` adapter weights, or None (no adapter: ``k̄`` alone).

    Returns:
        ``[B, N, d]`` in fp32 at least (fp64 stays fp64) for keys; a given head mean keeps its dtype.
    """
    k = (key_metric(keys) if keys.dim() == 4 else keys).detach()
    if down is None:
        return k
    hidden = torch.nn.functional.relu(k @ down.to(k.dtype).transpose(0, 1))
    return k + hidden @ up.to(k.dtype).transpose(0, 1)


# The most prefix tokens the error below considers (CLS, a distillation token, a few registers): a
# protect= value beyond it would hide patches from the merge, which is no fix for a patch grid that
# is not square, so it is never suggested.
FPET_MAX_PREFIX = 8


def _square_protect(num_tokens: int, protected: int) -> Optional[int]:
    """The protect value nearest ``protected`` (ties: the smaller), at most ``FPET_MAX_PREFIX``, that
    leaves a square grid of at least 2×2 patches; None when there is none."""
    fits = [
        p for p in range(min(num_tokens, FPET_MAX_PREFIX + 1))
        if p != protected and num_tokens - p >= 4 and math.isqrt(num_tokens - p) ** 2 == num_tokens - p
    ]
    return min(fits, key=lambda p: (abs(p - protected), p), default=None)


def fpet_grid(num_tokens: int, protected: int) -> int:
    """Side ``s`` of the square patch grid of the ``T = N - protected`` non-protected tokens."""
    t = num_tokens - protected
    side = math.isqrt(max(t, 0))
    if t < 0 or side * side != t:
        head = (
            f"FPET splits the patch grid like a checkerboard: {num_tokens} tokens with {protected} "
            f"protected leave {t} patches, which is not a square grid (side {side} gives "
            f"{side * side})"
        )
        p = _square_protect(num_tokens, protected)
        if p is not None:
            s = math.isqrt(num_tokens - p)
            raise ConfigError(
                f"{head}. If the model has {p or 'no'} prefix token{'' if p == 1 else 's'} (CLS, "
                f"distillation, registers) before a {s}x{s} patch grid, give protect={p}; otherwise "
                f"FPET cannot reduce it: it needs a square patch grid"
            )
        raise ConfigError(
            f"{head}, and no protect= value (0 to {FPET_MAX_PREFIX} prefix tokens) leaves one: FPET "
            f"needs a square patch grid, and this model's {num_tokens} tokens leave none (a "
            f"non-square grid such as 10x8 cannot be split like a checkerboard here); use another "
            f"method"
        )
    return side


@lru_cache(maxsize=None)
def fpet_sides(side: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Grid positions ``row * side + col`` of A and B, in the official code's order.

    A = (even row, even col) row-major, then (odd row, odd col); B = (odd row, even col) row-major,
    then (even row, odd col).
    """
    cells = [(row, col) for row in range(side) for col in range(side)]
    groups = [
        [p for p, (row, col) in enumerate(cells) if row % 2 == pr and col % 2 == pc]
        for pr, pc in ((0, 0), (1, 1), (1, 0), (0, 1))
    ]
    return tuple(groups[0] + groups[1]), tuple(groups[2] + groups[3])


@lru_cache(maxsize=None)
def _inverse(side: int) -> tuple[int, ...]:
    """Place in (A order, then B order) of each grid position."""
    side_a, side_b = fpet_sides(side)
    place = {p: k for k, p in enumerate(side_a + side_b)}
    return tuple(place[p] for p in range(side * side))


def fpet_cap(num_tokens: int, protected: int) -> int:
    """The most tokens FPET's one block removes: every A token (``⌈T/2⌉``), when B is non-empty."""
    side = fpet_grid(num_tokens, protected)
    n_a, n_b = map(len, fpet_sides(side))
    return n_a if n_b else 0


def fpet_match(
    metric: Tensor,
    r: int,
    protected: int = 0,
    *,
    size: Optional[Tensor] = None,
    down: Optional[Tensor] = None,
    up: Optional[Tensor] = None,
    x: Optional[Tensor] = None,
    impl: str = "torch",
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """FPET's checkerboard merge, as a destination map with straight-through merge weights.

    The ``T = N - protected`` patches form a square grid; A = (even row, even col) ∪ (odd row, odd
    col), B = the rest (orders: :func:`fpet_sides`). Each A token's best B partner by cosine
    similarity on :func:`fpet_metric` (with the adapter ``down``/``up`` when given); the ``r`` A
    tokens with the best partner scores (ties: the lower A index) merge into their partner,
    size-weighted. The official tie rule: a source whose two best scores are equal (``hard = score >
    mean of the top two`` picks no partner there) is dropped; to keep the shapes static it keeps a
    slot's index in ``dest`` (its best partner's, the lowest B index) with merge weight 0 and size 0,
    so it adds nothing (in a source map its patches stay with that partner). The official code also puts the CLS token
    in B but sets its scores to -inf, so protected tokens never merge there either: here they are
    simply left out of B. Output order: the protected tokens, the kept A tokens, then the B tokens,
    each in the official order (at ``r = |A|``, the official output up to where protected tokens sit).

    Training (grad enabled and an adapter weight requires grad): the forward is the hard merge bit
    for bit; each source's weight is ``size · (1 + p − p.detach())`` with ``p = sigmoid(score − mean
    of the top two)`` at its chosen partner, the official straight-through rule on that entry (the
    official dense assignment also passes gradient through the other entries:
    :func:`tomec.train.fpet.train_adapter` trains with it).

    Args:
        metric: keys ``[B, H, N, d]`` (averaged over heads), or a ready ``[B, N, d]``.
        r: tokens to remove, ``0 <= r <= |A|``.
        size: ``[B, N, 1]`` sizes entering the block, or None (all ones).
        down, up: the refinement adapter's effective weights ``[h, d]``, ``[d, h]`` (or None).
        x: the tokens ``[B, N, C]`` (only their dtype is used: the sizes' when ``size`` is None).

    Returns:
        ``dest [B, N]`` int64, merge weights ``w [B, N, 1]`` (None: the sizes), the sizes to sum
        ``[B, N, 1]`` (None: the sizes; tied sources 0).
    """
    check_dtype(metric.dtype, "the merge metric")
    if metric.dim() not in (3, 4):
        raise ConfigError(f"metric must be [B, N, d] or keys [B, H, N, d], got {list(metric.shape)}")
    resolve_impl(impl, metric.device)  # validates; plain PyTorch on every device
    if (down is None) != (up is None):
        raise ConfigError("FPET: the refinement adapter needs both weights (down and up)")
    metric = fpet_metric(metric, down, up)
    batch, n, _ = metric.shape
    check_protected(n, protected)
    cap = fpet_cap(n, protected)
    if not 0 <= r <= cap:
        raise ConfigError(f"FPET: r={r} is outside [0, {cap}] for {n} tokens with {protected} protected")
    device = metric.device
    if r == 0:
        return torch.arange(n, device=device).expand(batch, n), None, size
    side = fpet_grid(n, protected)
    side_a, side_b = fpet_sides(side)
    n_a, n_b = len(side_a), len(side_b)
    # .to(device), not device=: under a fake-tensor mode (tomec.flops on meta) torch.tensor(..., device=)
    # gives a plain tensor
    pos_a = torch.tensor(side_a).to(device)
    pos_b = torch.tensor(side_b).to(device)

    m = scoring_metric(metric[:, protected:])
    wide = m.dtype
    scores = cosine(m[:, pos_a], m[:, pos_b])
    top2 = scores.topk(min(2, n_b), dim=-1).values  # [B, n_a, <=2]; differentiable
    best, partner = scores.detach().max(dim=-1)  # [B, n_a]; the first maximal index
    is_src = descending_rank(best) < r
    # the official hard rule, as it computes it: a partner only where sigmoid(score − mean of the
    # two best) > 1/2, so no partner when the two best are equal (or a rounding apart)
    hard = torch.sigmoid(top2[..., 0] - top2.mean(-1)) > 0.5
    tied = is_src & ~hard if n_b > 1 else torch.zeros_like(is_src)

    slot_b = protected + (n_a - r) + torch.arange(n_b, device=device)
    slot_kept = protected - 1 + (~is_src).cumsum(-1)
    slot_a = torch.where(is_src, slot_b[partner], slot_kept)
    # Back from (A order, B order) to grid positions: a static permutation.
    inverse = torch.tensor(_inverse(side)).to(device)
    tail = torch.cat([slot_a, slot_b.expand(batch, n_b)], dim=1)[:, inverse]
    head = torch.arange(protected, device=device).expand(batch, protected)
    dest = torch.cat([head, tail], dim=1)

    def per_token(a_values: Tensor, rest: float) -> Tensor:
        """``[B, n_a]`` values of the A tokens -> ``[B, N, 1]`` at their positions (``rest`` elsewhere)."""
        full = torch.cat([a_values, torch.full((batch, n_b), rest, device=device, dtype=a_values.dtype)], 1)
        full = torch.cat([torch.full((batch, protected), rest, device=device, dtype=a_values.dtype),
                          full[:, inverse]], 1)
        return full.unsqueeze(-1)

    dtype = metric.dtype if x is None else x.dtype
    sizes = torch.ones(batch, n, 1, device=device, dtype=dtype) if size is None else size
    keep = per_token((~tied).to(wide), 1.0).to(sizes.dtype)  # 0 for a tied (dropped) source
    merge_size = sizes * keep  # exact: a product with 1 or 0
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (down, up))
    if not training:
        return dest, None, merge_size
    # Straight-through: p - p.detach() is exactly 0 forward, so w equals the sizes bit for bit.
    p = torch.sigmoid(scores.gather(-1, partner.unsqueeze(-1)).squeeze(-1) - top2.mean(-1))
    nudge = per_token(torch.where(is_src, p - p.detach(), torch.zeros_like(p)), 0.0)
    w = sizes * keep * (1.0 + nudge).to(sizes.dtype)
    return dest, w, merge_size


# --- the learned adapter (its training: tomec.train.fpet) ---------------------------------------------


# The official 1-bit code: its Lloyd-Max iteration lands on the quartiles of a unit Gaussian, kept
# in fp32 (``torch.tensor(values).float()``).
BINARY_LEVEL = float(torch.tensor(0.6744897501960817, dtype=torch.float32))
NO_ADAPTER_WARNING = (
    "fpet: no refinement adapter given (adapter=None): the metric is the head-mean keys alone, "
    "FPET before its adapter is trained; train one with tomec.train.fpet.train_adapter and pass adapter="
)


def binarize(weight: Tensor) -> Tensor:
    """The official 1-bit weight ``σ · c · sign((W − μ) / (σ + 1e-5)) + μ``, with the straight-
    through gradient (identity through the sign) of its training."""
    mean, std = weight.mean(), weight.std()
    unit = (weight - mean) / (std + 1e-5)
    code = torch.sign(unit) * BINARY_LEVEL
    return (code + unit - unit.detach()) * std + mean


class FpetWeights(dict):
    """An adapter's effective (already binarized) weights ``{"down", "up"}``: what ``adapter=``
    becomes once checked; checked again, it passes through unchanged."""


def _raw_weights(adapter: AdapterLike) -> tuple[Tensor, Tensor]:
    if isinstance(adapter, nn.Module) and hasattr(adapter, "down") and hasattr(adapter, "up"):
        return adapter.down.detach(), adapter.up.detach()  # an FpetAdapter (tomec.train.fpet), raw weights
    where = "(state dict)"
    if isinstance(adapter, (str, Path)):
        where = f"in {adapter}"
        adapter = load_state_file(adapter, "fpet: adapter")
    if not isinstance(adapter, Mapping):
        raise ConfigError(
            f"fpet: adapter must be a path, a state dict or an FpetAdapter, got {type(adapter).__name__}"
        )
    for down_key, up_key in (("down", "up"), ("adapter_down.weight", "adapter_up.weight")):
        if down_key in adapter and up_key in adapter:
            down, up = adapter[down_key], adapter[up_key]
            break
    else:
        raise ConfigError(
            f"fpet: the adapter {where} must hold 'down' and 'up' (or the official "
            f"'adapter_down.weight' and 'adapter_up.weight'), found {sorted(map(str, adapter))}"
        )
    if down.dim() != 2 or up.dim() != 2 or up.shape != (down.shape[1], down.shape[0]):
        raise ConfigError(
            f"fpet: adapter weights {where} must be down [h, d] and up [d, h], got "
            f"{list(down.shape)} and {list(up.shape)}"
        )
    return down, up


def load_adapter(adapter: Optional[AdapterLike]) -> Optional[FpetWeights]:
    """Any accepted form of ``adapter=`` as its effective 1-bit weights ``{"down", "up"}`` (fp32 at
    least, detached), or None."""
    if adapter is None or isinstance(adapter, FpetWeights):
        return adapter
    down, up = _raw_weights(adapter)
    wide = torch.float64 if down.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        return FpetWeights(down=binarize(down.to(wide)).detach(), up=binarize(up.to(wide)).detach())


def check_adapter(adapter: Any) -> Optional[FpetWeights]:
    """``adapter=`` validated (its effective weights), (None when absent)."""
    weights = load_adapter(adapter)
    return weights


@dataclass(frozen=True)
class FpetOptions(Options):
    """``block``: the one reduction block (None: the middle one); ``adapter``: the trained refinement
    adapter (a path, a state dict, an FpetAdapter; None: the keys alone)."""

    method = "fpet"
    param_fields = ("adapter",)
    block: Optional[int] = None
    adapter: Optional[Any] = None

    def __post_init__(self) -> None:
        self._set("block", check_int("fpet", "block", self.block, optional=True,
                                     kind="a block index >= 0", what=" or None (the middle one)"))
        self._set("adapter", check_adapter(self.adapter))


def _params(options: FpetOptions, *, layer: int, num_layers: int, channels: int, head_dim: int) -> dict:
    weights = options.adapter
    if weights is None:
        return {}
    if weights["down"].shape[1] != head_dim:
        raise ConfigError(
            f"fpet: the adapter takes {weights['down'].shape[1]}-wide keys, the model's attention "
            f"heads are {head_dim} wide"
        )
    return dict(weights)


def _match(inp: MatchInput, options: FpetOptions) -> MatchResult:
    dest, w, sizes = fpet_match(inp.keys, inp.r, inp.protected, size=inp.size, down=inp.params.get("down"),
                                up=inp.params.get("up"), x=inp.x, impl=inp.impl)
    return MatchResult(dest, w, sizes)


def _blocks(options: FpetOptions, num_layers: int) -> list[int]:
    return [num_layers // 2 if options.block is None else options.block]


def _advise(options: FpetOptions) -> Optional[str]:
    return NO_ADAPTER_WARNING if options.adapter is None else None


register(Method(name="fpet", options=FpetOptions, match=_match, cap=fpet_cap, params=_params,
                reduction_blocks=_blocks, advise=_advise))
