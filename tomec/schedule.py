"""Merge schedules: how many tokens each block removes.

``r`` is the total number of tokens removed over the whole network; ``inflect`` in [-1, 1] shapes how
it is spread (0 constant, negative front-loaded, positive back-loaded). The exact rule is the one of
METHODS.md, which reproduces the seed toolbox's numbers: for a base value ``b`` the per-layer counts
are ``lo = int(b * (1 - inflect))``, ``hi = 2 * b - lo``, ``r_i = int(lo + (hi - lo) * i / (L - 1))``;
the integer ``b`` whose sum is closest to ``r`` wins (ties: the smaller ``b``) and the remainder goes
to the first layer (inflect < 0) or the last one. A block may remove at most ``cap(N_l, P)`` tokens
(ToMe's ``(N_l - P) // 2`` by default): the excess moves to the nearest later block with room.

Other forms: an explicit per-block ``list``, a ToMe-style ``(r_per_layer, inflect)`` tuple, and
``keep_ratio(ratio)`` (PiToMe's kept ratio per block). Every form resolves to a list of ints that sums
to exactly what was asked, or raises :class:`~tomec.errors.ScheduleError` naming the numbers.

Methods that reduce only at some blocks (ATC, FPET) pass ``blocks=``: ``r`` is spread by the same
rule over ``len(blocks)`` entries, which are placed at those blocks; every other block's cap is 0, so
excess carries to the next reduction block with room, and an explicit list that removes tokens
elsewhere is an error naming the block.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from .errors import ConfigError, ScheduleError

__all__ = [
    "KeepRatio",
    "keep_ratio",
    "per_layer",
    "spread",
    "resolve",
    "tome_cap",
    "check_blocks",
    "ScheduleSpec",
]

CapFn = Callable[[int, int], int]


@dataclass(frozen=True)
class KeepRatio:
    """PiToMe's schedule form: a block with ``T`` mergeable tokens removes ``floor(T - T * ratio)``."""

    ratio: float

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, numbers.Real) or not 0.0 < float(self.ratio) <= 1.0:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.ratio!r}")


def keep_ratio(ratio: float) -> KeepRatio:
    """Schedule that keeps ``ratio`` of each block's mergeable tokens (PiToMe's published form)."""
    return KeepRatio(float(ratio))


ScheduleSpec = Union[Sequence[int], tuple, KeepRatio]


def tome_cap(num_tokens: int, num_protected: int) -> int:
    """ToMe's per-block cap: at most half of the mergeable (non-protected) tokens."""
    return max(num_tokens - num_protected, 0) // 2


def _as_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{what} must be a non-negative integer, got {value!r}")
    if int(value) < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {int(value)}")
    return int(value)


def check_inflect(inflect: object) -> float:
    """Validate ``inflect`` (a real number in [-1, 1]) and return it as a float."""
    if isinstance(inflect, bool) or not isinstance(inflect, numbers.Real) or math.isnan(inflect):
        raise ConfigError(f"inflect must be a number in [-1, 1], got {inflect!r}")
    if abs(float(inflect)) > 1.0:
        raise ConfigError(f"inflect must be in [-1, 1], got {float(inflect)}")
    return float(inflect)


def check_r(r: object) -> int:
    """Validate a total token count ``r``."""
    return _as_count(r, "r (the total number of tokens to remove)")


def per_layer(base: int, inflect: float, num_layers: int) -> list[int]:
    """ToMe's per-layer rule for a base value ``base``: ``r_i = int(lo + (hi - lo) * i / (L - 1))``."""
    if num_layers == 1:
        return [base]
    lo = int(base * (1.0 - inflect))
    hi = 2 * base - lo
    return [int(lo + (hi - lo) * i / (num_layers - 1)) for i in range(num_layers)]


def _push(values: list[int], amount: int, order: Sequence[int]) -> list[int]:
    """Add ``amount`` (possibly negative) at ``order[0]``; a deficit below zero moves on along ``order``."""
    out = list(values)
    for i in order:
        out[i] += amount
        if out[i] >= 0:
            return out
        amount, out[i] = out[i], 0
    raise ScheduleError(f"internal: cannot place remainder {amount} in {values}")


def _total(base: int, inflect: float, num_layers: int) -> int:
    return sum(per_layer(base, inflect, num_layers))


def _first_above(target: int, inflect: float, num_layers: int) -> int:
    """The smallest ``b >= 0`` whose total exceeds ``target``, by bisection: the total never decreases
    with ``b`` (``lo`` and ``hi`` of :func:`per_layer` both grow with it, as ``1 - inflect`` is in
    [0, 2]), and it lies within ``L b - L`` (each of the ``L`` entries truncates less than 1 below
    the line from ``lo`` to ``hi``, whose mean is ``b``) and ``L b``. So the answer is within a few
    of ``target / L``: a handful of sums, whatever ``target`` is."""
    low = max(target, -1) // num_layers + 1  # below it, L b <= target: no b there qualifies
    high = (max(target, 0) + num_layers + 1) // num_layers + 1  # L b - L - 1 > target
    while _total(high, inflect, num_layers) <= target:  # not expected: rounding beyond the bound
        low, high = high + 1, 2 * high
    while low < high:
        mid = (low + high) // 2
        if _total(mid, inflect, num_layers) > target:
            high = mid
        else:
            low = mid + 1
    return low


def spread(r: int, num_layers: int, inflect: float = -0.5) -> list[int]:
    """Spread a total ``r`` over ``num_layers`` blocks by the METHODS.md rule (no caps applied).

    The base ``b`` is the one whose total is closest to ``r`` (ties: the smaller), found by a short
    bisection (:func:`_first_above`): the time does not grow with ``r``.

    >>> spread(98, 12, -0.5)
    [8, 12, 11, 10, 10, 9, 8, 7, 7, 6, 5, 5]
    """
    r = check_r(r)
    inflect = check_inflect(inflect)
    if num_layers < 1:
        raise ScheduleError(f"cannot spread r={r} over {num_layers} blocks")
    # The smallest b summing to more than r; below it every total is at most r, so the closest
    # under r is the smallest b reaching the largest of them (the total at above - 1).
    above = _first_above(r, inflect, num_layers)  # >= 1: the total at 0 is 0
    under = _total(above - 1, inflect, num_layers)
    best_b = _first_above(under - 1, inflect, num_layers) if under > 0 else 0
    if _total(above, inflect, num_layers) - r < r - _total(best_b, inflect, num_layers):
        best_b = above
    values = per_layer(best_b, inflect, num_layers)
    remainder = r - sum(values)
    order = range(num_layers) if inflect < 0 else range(num_layers - 1, -1, -1)
    return _push(values, remainder, list(order))


def _cap_rule(cap: CapFn) -> str:
    """How a block's cap reads in an error message."""
    return "at most half of its mergeable tokens" if cap is tome_cap else "the method's per-block cap"


def _block_cap(cap: CapFn, blocks: Optional[Sequence[int]]) -> Callable[[int, int, int], int]:
    """``(layer, N_l, P) -> cap``: the method's cap at reduction blocks, 0 at every other block."""
    if blocks is None:
        return lambda layer, n, p: cap(n, p)
    allowed = frozenset(blocks)
    return lambda layer, n, p: cap(n, p) if layer in allowed else 0


def _capacity(
    num_layers: int, num_tokens: int, num_protected: int, cap: CapFn,
    blocks: Optional[Sequence[int]] = None,
) -> int:
    cap_at = _block_cap(cap, blocks)
    n, total = num_tokens, 0
    for layer in range(num_layers):
        take = cap_at(layer, n, num_protected)
        total += take
        n -= take
    return total


def _carry_forward(
    wanted: Sequence[int], num_tokens: int, num_protected: int, cap: CapFn, what: str,
    blocks: Optional[Sequence[int]] = None,
) -> list[int]:
    """Apply the per-block cap; what exceeds it moves to the nearest later block with room."""
    cap_at = _block_cap(cap, blocks)
    out, n, carry = [], num_tokens, 0
    for layer, want in enumerate(wanted):
        want += carry
        take = min(want, cap_at(layer, n, num_protected))
        carry = want - take
        out.append(take)
        n -= take
    if carry:
        where = "" if blocks is None else f" (reduction blocks {list(blocks)})"
        raise ScheduleError(
            f"{what} cannot be met: after moving each block's excess over its cap ({_cap_rule(cap)}) "
            f"to later blocks{where}, {carry} tokens are left over at the last block "
            f"(placed so far: {out}, {num_tokens} tokens with {num_protected} protected). Lower r, "
            f"use a smaller inflect, or pass an explicit schedule list."
        )
    return out


def check_blocks(
    blocks: Sequence[int], num_layers: Optional[int], what: str = "reduction blocks"
) -> list[int]:
    """Validate reduction block indices: sorted, distinct, and (given the model's depth) in range."""
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
        raise ConfigError(f"{what} must be a non-empty list of block indices, got {blocks!r}")
    out = [_as_count(b, f"{what}[{i}]") for i, b in enumerate(blocks)]
    if len(set(out)) != len(out):
        raise ConfigError(f"{what} {out} name a block twice")
    bad = [] if num_layers is None else [b for b in out if b >= num_layers]
    if bad:
        raise ScheduleError(
            f"{what} {out}: block(s) {bad} do not exist; the model has {num_layers} attention blocks "
            f"(0..{num_layers - 1})"
        )
    return sorted(out)


def _place(values: Sequence[int], blocks: Optional[Sequence[int]], num_layers: int) -> list[int]:
    """Entries for the reduction blocks -> a full per-block list with zeros elsewhere."""
    if blocks is None:
        return list(values)
    out = [0] * num_layers
    for b, v in zip(blocks, values):
        out[b] = v
    return out


def resolve(
    num_layers: int,
    num_tokens: int,
    num_protected: int,
    *,
    r: Optional[int] = None,
    inflect: float = -0.5,
    schedule: Optional[ScheduleSpec] = None,
    cap: CapFn = tome_cap,
    blocks: Optional[Sequence[int]] = None,
) -> list[int]:
    """Resolve a schedule request into per-block token counts for a concrete model.

    Args:
        num_layers: number of attention blocks ``L``.
        num_tokens: tokens entering the first block (protected ones included).
        num_protected: protected prefix tokens ``P`` (CLS, distillation token, registers).
        r: total tokens to remove (exclusive with ``schedule``).
        inflect: shape of the spread of ``r`` over the blocks, in [-1, 1].
        schedule: an explicit list, a ToMe-style ``(r_per_layer, inflect)`` tuple or ``keep_ratio``.
        cap: the method's per-block maximum ``cap(N_l, P)``.
        blocks: the only blocks that reduce (None: every block). ``r`` and the tuple form are spread
            over ``len(blocks)`` entries placed at these blocks; other blocks' cap is 0.

    Returns:
        ``L`` non-negative ints, the tokens each block removes.
    """
    if num_layers < 1:
        raise ScheduleError(f"no blocks to schedule (num_layers={num_layers})")
    if r is not None and schedule is not None:
        raise ConfigError(f"give r= or schedule=, not both (got r={r!r}, schedule={schedule!r})")
    if r is None and schedule is None:
        raise ConfigError("give r= (tokens to remove in total) or schedule= (per-block counts)")
    if blocks is not None:
        blocks = check_blocks(blocks, num_layers)
    cap_at = _block_cap(cap, blocks)
    n_spread = num_layers if blocks is None else len(blocks)

    if isinstance(schedule, KeepRatio):
        out, n = [], num_tokens
        for layer in range(num_layers):
            t = n - num_protected
            take = math.floor(t - t * schedule.ratio)
            if blocks is not None and layer not in blocks:
                take = 0
            elif take > cap(n, num_protected):
                raise ScheduleError(
                    f"keep_ratio({schedule.ratio}) removes {take} of {t} mergeable tokens in block "
                    f"{layer}, more than its cap of {cap(n, num_protected)}"
                )
            out.append(take)
            n -= take
        return out

    if isinstance(schedule, tuple):
        if len(schedule) != 2:
            raise ConfigError(
                f"a tuple schedule is ToMe's (r_per_layer, inflect); got {len(schedule)} entries: "
                f"{schedule!r} (pass an explicit schedule as a list)"
            )
        base = _as_count(schedule[0], "r_per_layer")
        wanted = _place(per_layer(base, check_inflect(schedule[1]), n_spread), blocks, num_layers)
        if any(v < 0 for v in wanted):
            raise ScheduleError(f"schedule {schedule!r} gives negative entries: {wanted}")
        what = f"schedule {schedule!r} (= {wanted}, {sum(wanted)} tokens)"
        _check_total(sum(wanted), num_layers, num_tokens, num_protected, cap, what, blocks)
        return _carry_forward(wanted, num_tokens, num_protected, cap, what, blocks)

    if schedule is not None:
        if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
            raise ConfigError(
                f"schedule must be a list of per-block counts, a (r_per_layer, inflect) tuple or "
                f"keep_ratio(...), got {schedule!r}"
            )
        values = [_as_count(v, f"schedule[{i}]") for i, v in enumerate(schedule)]
        if len(values) != num_layers:
            raise ScheduleError(
                f"schedule has {len(values)} entries but the model has {num_layers} attention blocks"
            )
        n = num_tokens
        for layer, v in enumerate(values):
            if blocks is not None and layer not in blocks and v:
                raise ScheduleError(
                    f"schedule[{layer}]={v} removes tokens at block {layer}, which does not reduce: "
                    f"this method reduces only at blocks {blocks}"
                )
            c = cap_at(layer, n, num_protected)
            if v > c:
                rule = "at most half of the mergeable ones merge" if cap is tome_cap else "the method's cap"
                raise ScheduleError(
                    f"schedule[{layer}]={v} exceeds block {layer}'s cap of {c} (it receives {n} "
                    f"tokens, {num_protected} protected; {rule})"
                )
            n -= v
        return values

    r = check_r(r)
    check_inflect(inflect)
    what = f"r={r} with inflect={inflect}"
    # the capacity first: an r no model could meet is refused before it is spread
    _check_total(r, num_layers, num_tokens, num_protected, cap, what, blocks)
    wanted = _place(spread(r, n_spread, inflect), blocks, num_layers)
    return _carry_forward(wanted, num_tokens, num_protected, cap, what, blocks)


def _check_total(
    total: int, num_layers: int, num_tokens: int, num_protected: int, cap: CapFn, what: str,
    blocks: Optional[Sequence[int]] = None,
) -> None:
    capacity = _capacity(num_layers, num_tokens, num_protected, cap, blocks)
    if total > capacity:
        who = f"{num_layers} blocks" if blocks is None else f"the reduction blocks {list(blocks)}"
        why = (
            "since a block merges at most half of its mergeable tokens" if cap is tome_cap
            else "under the method's per-block cap"
        )
        raise ScheduleError(
            f"{what} asks to remove more tokens than exist to merge: {who} can remove "
            f"at most {capacity} of the {num_tokens - num_protected} mergeable tokens ({num_tokens} "
            f"tokens, {num_protected} protected), {why}"
        )
