"""MCTF (Multi-Criteria Token Fusion, CVPR'24): attention received and the multi-criteria matching.

METHODS.md, MCTF; the official code (mlvlab/MCTF, ``utils/mctf.py``) settles the details the paper
leaves open: the similarity is on the tokens ``x`` (not the keys), the informativeness and size
criteria are normalised by their per-image maximum before the power, the second direction reuses the
first direction's pair scores, and its unmerged B tokens come out in descending order of their best
score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tomec.errors import ConfigError

from tomec.ops.attention import attention_received
from tomec.ops.common import check_dtype, descending_rank
from tomec.ops.bipartite import ab_blocked, check_protected, cosine, interleave, scoring_metric
from tomec.schedule import tome_cap

from .core import MatchInput, MatchResult, Method, Options, check_bool, check_real, register

__all__ = ["MctfOptions", "mctf_match", "mctf_cap", "MCTF_FLOOR"]


def _check_taus(tau_sim: float, tau_info: float, tau_size: float) -> None:
    for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)):
        if not tau >= 0:
            raise ConfigError(f"MCTF: {name} must be >= 0 (0 disables the criterion), got {tau!r}")


def _pair_power(u: Tensor, tau: float) -> Tensor:
    """``(u_a · u_b) ** (1 / tau)`` for the A×B pairs, ``u [B, N]`` already scaled into (0, 1]."""
    return (u[:, ::2, None] * u[:, None, 1::2]) ** (1.0 / tau)


def mctf_match(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    size: Optional[Tensor],
    r: int,
    protected: int = 0,
    *,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    bidirectional: bool = True,
    scale: Optional[float] = None,
    prop_attn: bool = True,
    impl: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    """MCTF's bidirectional multi-criteria bipartite matching (METHODS.md, MCTF; mlvlab/MCTF).

    Tokens split by position parity as ToMe (A even, B odd; protected tokens are neither source nor
    destination). Pair score = similarity ``((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)`` ×
    informativeness ``(ι_a ι_b) ** (1 / tau_info)`` × size ``(σ_a σ_b) ** (1 / tau_size)``, where
    ``ι = (1 / recv) / max(1 / recv)`` (``recv``: :func:`attention_received`) and
    ``σ = (1 / size) / max(1 / size)`` per image; a criterion with ``tau = 0`` is left out (as is the
    size criterion before the first merge, when ``size`` is None).

    Direction 1: the ``r1`` A tokens with the highest best score merge into their best B token.
    Direction 2 (bidirectional): every non-protected B token (a direction-1 destination included, its
    group then moves with it) scores against the A tokens left unmerged, with the same pair scores;
    the ``r2`` B tokens with the highest best score merge into their best such A token.
    ``r1, r2 = r // 2, r - r // 2`` (bidirectional) or ``r, 0``. Ties: the lower index.

    Output order: the protected tokens, the unmerged A tokens by position, then the unmerged B tokens
    (bidirectional: in descending order of their direction-2 best score, as the official code
    concatenates them; otherwise by position). ``r = 0`` is the identity.

    Args:
        x: ``[B, N, C]`` the tokens (the similarity's features); q, k: ``[B, H, N, d]`` the block's
            queries and keys; size: ``[B, N, 1]`` or None (all ones).
        r: tokens removed, ``0 <= r <= (N - protected) // 2``.
        scale, prop_attn: as the block's attention (see :func:`attention_received`).

    Returns:
        ``dest [B, N]`` int64, ``w [B, N, 1]`` merge weights (attention received × size, in
        ``x.dtype``), ``size [B, N, 1]`` the sizes to sum.
    """
    check_dtype(x.dtype, "merged tokens")
    _check_taus(tau_sim, tau_info, tau_size)
    batch, n, _ = x.shape
    check_protected(n, protected)
    cap = (n - protected) // 2
    if not 0 <= r <= cap:
        raise ConfigError(f"MCTF: r={r} is outside [0, {cap}] for {n} tokens with {protected} protected")
    device = x.device
    sizes = x.new_ones(batch, n, 1) if size is None else size
    recv = attention_received(q, k, size, scale, prop_attn, impl=impl)  # [B, N]
    # scaled by each image's largest attention (the weighted mean does not change): a token that
    # receives almost no attention would otherwise underflow to a zero weight in fp16 and make a
    # group of such tokens 0 / 0
    top = recv.amax(-1, keepdim=True).clamp_min(torch.finfo(recv.dtype).tiny)
    w = ((recv / top).unsqueeze(-1) * sizes.to(recv.dtype)).clamp_min(torch.finfo(x.dtype).tiny).to(x.dtype)
    if r == 0:
        return torch.arange(n, device=device).expand(batch, n), w, sizes

    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    m = scoring_metric(x)
    wide = m.dtype
    a, b = m[:, ::2], m[:, 1::2]
    n_a, n_b = a.shape[1], b.shape[1]
    prot_a, prot_b = (protected + 1) // 2, protected // 2
    ia = torch.arange(n_a, device=device)
    ib = torch.arange(n_b, device=device)

    scores = torch.ones(batch, n_a, n_b, device=device, dtype=wide)
    if tau_sim:
        # the clamp only keeps a cosine rounded below -1 from a NaN under a fractional power
        scores = ((cosine(a, b) + 1) / 2).clamp_min(0) ** (1.0 / tau_sim)
    if tau_info:
        inv = 1.0 / recv.to(wide).clamp_min(torch.finfo(wide).tiny)  # low attention: informative-less
        scores = scores * _pair_power(inv / inv.amax(-1, keepdim=True), tau_info)
    if tau_size and size is not None:
        inv = 1.0 / size.to(wide).squeeze(-1)
        scores = scores * _pair_power(inv / inv.amax(-1, keepdim=True), tau_size)
    blocked = ab_blocked(n_a, n_b, protected, device)
    scores = scores.masked_fill(blocked, float("-inf"))

    # Direction 1: A -> B.
    best, partner = scores.max(dim=-1)  # [B, n_a]; the first maximal (lowest) B index
    is_src = descending_rank(best) < r1
    kept_a = ~is_src & (ia >= prot_a)
    slot_kept_a = protected - 1 + kept_a.cumsum(-1)
    n_kept_a = n_a - prot_a - r1

    # Direction 2: B -> the A tokens direction 1 left; the same pair scores, transposed.
    if r2:
        back = scores.masked_fill(is_src.unsqueeze(-1), float("-inf")).transpose(1, 2)
        best2, partner2 = back.max(dim=-1)  # [B, n_b]; ties: the lowest A position
        rank2 = descending_rank(best2)  # protected B rows are all -inf: they rank last
        is_src2 = rank2 < r2
        place_b = rank2 - r2
    else:
        partner2 = torch.zeros(batch, n_b, dtype=torch.int64, device=device)
        is_src2 = torch.zeros(batch, n_b, dtype=torch.bool, device=device)
        place_b = (ib - prot_b).expand(batch, n_b)
    own_b = torch.where(ib < prot_b, 2 * ib + 1, protected + n_kept_a + place_b)
    slot_b = torch.where(is_src2, slot_kept_a.gather(1, partner2), own_b)
    # A sources follow their B partner, wherever direction 2 sent it.
    slot_a = torch.where(ia < prot_a, 2 * ia, torch.where(is_src, slot_b.gather(1, partner), slot_kept_a))
    return interleave(slot_a, slot_b), w, sizes


MCTF_FLOOR = 10  # the official merge never leaves fewer tokens than this (CLS included)


def mctf_cap(num_tokens: int, num_protected: int) -> int:
    """MCTF's per-block cap, as its official merge clamps ``r``: ToMe's half of the mergeable tokens,
    and at least ``MCTF_FLOOR`` tokens left.

    Bidirectional, the ``ceil(r/2)`` B sources still fit among the non-protected B tokens with a
    non-protected A token left to receive them; bidirectional matching alone could remove more, but
    the official code does not allow it."""
    return max(min(tome_cap(num_tokens, num_protected), num_tokens - MCTF_FLOOR), 0)


@dataclass(frozen=True)
class MctfOptions(Options):
    """The three criteria's temperatures (0 leaves a criterion out), both matching directions, and
    the official one-step-ahead merge (at the block's input, with the block's own attention)."""

    method = "mctf"
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirectional: bool = True
    one_step_ahead: bool = True

    def __post_init__(self) -> None:
        for name in ("tau_sim", "tau_info", "tau_size"):
            self._set(name, check_real("mctf", name, getattr(self, name), kind="a finite number >= 0",
                                       what=" (0 disables it)", valid=lambda v: 0 <= v < math.inf))
        check_bool("mctf", "bidirectional", self.bidirectional)
        check_bool("mctf", "one_step_ahead", self.one_step_ahead)


def _match(inp: MatchInput, options: MctfOptions) -> MatchResult:
    dest, w, sizes = mctf_match(
        inp.x, inp.queries, inp.keys, inp.size, inp.r, inp.protected, tau_sim=options.tau_sim,
        tau_info=options.tau_info, tau_size=options.tau_size, bidirectional=options.bidirectional,
        scale=inp.scale, prop_attn=inp.prop_attn, impl=inp.impl,
    )
    return MatchResult(dest, w, sizes)


def _reduction_blocks(options: MctfOptions, num_layers: int) -> Optional[list[int]]:
    """One step ahead, block 0 is left alone (the official DeiT setting: ``--activate_layer 1..11``):
    its merge would act on the patch embedding."""
    return list(range(1, num_layers)) if options.one_step_ahead and num_layers > 1 else None


register(
    Method(
        name="mctf",
        options=MctfOptions,
        match=_match,
        site=lambda options: "ahead" if options.one_step_ahead else "attention",
        cap=mctf_cap,
        reduction_blocks=_reduction_blocks,
    )
)
