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


def spread(r: int, num_layers: int, inflect: float = -0.5) -> list[int]:
    """Spread a total ``r`` over ``num_layers`` blocks by the METHODS.md rule (no caps applied).

    >>> spread(98, 12, -0.5)
    [8, 12, 11, 10, 10, 9, 8, 7, 7, 6, 5, 5]
    """
    r = check_r(r)
    inflect = check_inflect(inflect)
    if num_layers < 1:
        raise ScheduleError(f"cannot spread r={r} over {num_layers} blocks")
    best_b, best_err, b = 0, r, 0
    while True:
        total = sum(per_layer(b, inflect, num_layers))
        err = abs(total - r)
        if err < best_err:
            best_b, best_err = b, err
        if total > r or b > r:
            break
        b += 1
    values = per_layer(best_b, inflect, num_layers)
    remainder = r - sum(values)
    order = range(num_layers) if inflect < 0 else range(num_layers - 1, -1, -1)
    return _push(values, remainder, list(order))


def _capacity(num_layers: int, num_tokens: int, num_protected: int, cap: CapFn) -> int:
    n, total = num_tokens, 0
    for _ in range(num_layers):
        take = cap(n, num_protected)
        total += take
        n -= take
    return total


def _carry_forward(
    wanted: Sequence[int], num_tokens: int, num_protected: int, cap: CapFn, what: str
) -> list[int]:
    """Apply the per-block cap; what exceeds it moves to the nearest later block with room."""
    out, n, carry = [], num_tokens, 0
    for want in wanted:
        want += carry
        take = min(want, cap(n, num_protected))
        carry = want - take
        out.append(take)
        n -= take
    if carry:
        raise ScheduleError(
            f"{what} cannot be met: after moving each block's excess over its cap (at most half of "
            f"its mergeable tokens) to later blocks, {carry} tokens are left over at the last block "
            f"(placed so far: {out}, {num_tokens} tokens with {num_protected} protected). Lower r, "
            f"use a smaller inflect, or pass an explicit schedule list."
        )
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

    Returns:
        ``L`` non-negative ints, the tokens each block removes.
    """
    if num_layers < 1:
        raise ScheduleError(f"no blocks to schedule (num_layers={num_layers})")
    if r is not None and schedule is not None:
        raise ConfigError(f"give r= or schedule=, not both (got r={r!r}, schedule={schedule!r})")
    if r is None and schedule is None:
        raise ConfigError("give r= (tokens to remove in total) or schedule= (per-block counts)")

    if isinstance(schedule, KeepRatio):
        out, n = [], num_tokens
        for layer in range(num_layers):
            t = n - num_protected
            take = math.floor(t - t * schedule.ratio)
            if take > cap(n, num_protected):
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
        wanted = per_layer(base, check_inflect(schedule[1]), num_layers)
        if any(v < 0 for v in wanted):
            raise ScheduleError(f"schedule {schedule!r} gives negative entries: {wanted}")
        what = f"schedule {schedule!r} (= {wanted}, {sum(wanted)} tokens)"
        _check_total(sum(wanted), num_layers, num_tokens, num_protected, cap, what)
        return _carry_forward(wanted, num_tokens, num_protected, cap, what)

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
            c = cap(n, num_protected)
            if v > c:
                raise ScheduleError(
                    f"schedule[{layer}]={v} exceeds block {layer}'s cap of {c} (it receives {n} "
                    f"tokens, {num_protected} protected; at most half of the mergeable ones merge)"
                )
            n -= v
        return values

    r = check_r(r)
    wanted = spread(r, num_layers, inflect)
    what = f"r={r} with inflect={inflect}"
    _check_total(r, num_layers, num_tokens, num_protected, cap, what)
    return _carry_forward(wanted, num_tokens, num_protected, cap, what)


def _check_total(
    total: int, num_layers: int, num_tokens: int, num_protected: int, cap: CapFn, what: str
) -> None:
    capacity = _capacity(num_layers, num_tokens, num_protected, cap)
    if total > capacity:
        raise ScheduleError(
            f"{what} asks to remove more tokens than exist to merge: {num_layers} blocks can remove "
            f"at most {capacity} of the {num_tokens - num_protected} mergeable tokens ({num_tokens} "
            f"tokens, {num_protected} protected), since a block merges at most half of its "
            f"mergeable tokens"
        )
