"""tomec.schedule: the worked examples of METHODS.md/the issue, every form, and the errors."""

from __future__ import annotations

import pytest

from tomec import schedule
from tomec.errors import ConfigError, ScheduleError

L, N, P = 12, 197, 1  # DeiT-S: 196 patches + CLS


@pytest.mark.parametrize(
    "r,inflect,expected",
    [
        (98, -0.5, [8, 12, 11, 10, 10, 9, 8, 7, 7, 6, 5, 5]),
        (98, 0.0, [8] * 11 + [10]),
        (100, 0.5, [4, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 11]),
        (156, 0.0, [13] * 12),
        (0, -0.5, [0] * 12),
    ],
)
def test_worked_examples(r, inflect, expected):
    assert schedule.resolve(L, N, P, r=r, inflect=inflect) == expected


@pytest.mark.parametrize("inflect", [-1.0, -0.5, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("r", [0, 1, 7, 11, 13, 50, 97, 150, 180])
def test_totals_are_exact_and_within_caps(r, inflect):
    try:
        out = schedule.resolve(L, N, P, r=r, inflect=inflect)
    except ScheduleError as e:  # only back-loaded requests near the capacity may fail
        assert inflect > 0 and r >= 150, str(e)
        return
    assert sum(out) == r and len(out) == L and min(out) >= 0
    n = N
    for v in out:
        assert v <= (n - P) // 2
        n -= v


def test_spread_matches_the_rule_by_hand():
    # b = 9: lo = int(13.5) = 13, hi = 5, r_i = int(13 - 8 i / 11) sums to 103; remainder -5 to layer 0
    assert schedule.per_layer(9, -0.5, 12) == [13, 12, 11, 10, 10, 9, 8, 7, 7, 6, 5, 5]
    assert schedule.spread(98, 12, -0.5)[0] == 13 - 5
    assert schedule.spread(5, 1, 0.7) == [5]


def test_negative_remainder_moves_on_instead_of_going_negative():
    out = schedule.resolve(L, N, P, r=7, inflect=-0.5)  # b = 1 gives 12; remainder -5
    assert sum(out) == 7 and min(out) == 0


def test_cap_excess_moves_to_later_blocks():
    # 4 blocks over 21 tokens (1 protected): caps 10, then shrinking
    out = schedule.resolve(4, 21, 1, r=18, inflect=-1.0)
    assert sum(out) == 18
    n = 21
    for v in out:
        assert v <= (n - 1) // 2
        n -= v


def test_tome_tuple_and_list_and_keep_ratio():
    assert schedule.resolve(L, N, P, schedule=(8, 0.0)) == [8] * 12
    assert schedule.resolve(L, N, P, schedule=[0] * 11 + [5]) == [0] * 11 + [5]
    # PiToMe's kept ratio 0.9 on DeiT: the numbers METHODS.md quotes
    assert schedule.resolve(L, N, P, schedule=schedule.keep_ratio(0.9)) == [
        19, 17, 16, 14, 13, 11, 10, 9, 8, 7, 7, 6,
    ]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(r=-1), ConfigError, "non-negative integer, got -1"),
        (dict(r=2.5), ConfigError, "non-negative integer, got 2.5"),
        (dict(r=True), ConfigError, "non-negative integer"),
        (dict(r=300), ScheduleError, r"r=300 .* at most 195 of the 196 mergeable tokens"),
        (dict(r=10, inflect=1.5), ConfigError, r"inflect must be in \[-1, 1\], got 1.5"),
        (dict(schedule=[1, 2, 3]), ScheduleError, "3 entries but the model has 12 attention blocks"),
        (dict(schedule=[99] + [0] * 11), ScheduleError, r"schedule\[0\]=99 exceeds block 0's cap of 98"),
        (dict(schedule=[1] * 11 + [-1]), ConfigError, r"schedule\[11\] must be a non-negative"),
        (dict(schedule=(1, 2, 3)), ConfigError, "ToMe's \\(r_per_layer, inflect\\)"),
        (dict(schedule="8"), ConfigError, "schedule must be a list"),
        (dict(r=190, inflect=0.9), ScheduleError, "left over at the last block"),
        (dict(), ConfigError, "give r="),
        (dict(r=5, schedule=[0] * 12), ConfigError, "not both"),
    ],
)
def test_errors_name_the_numbers(kwargs, error, match):
    with pytest.raises(error, match=match):
        schedule.resolve(L, N, P, **kwargs)


def test_keep_ratio_validates():
    with pytest.raises(ConfigError, match="keep_ratio"):
        schedule.keep_ratio(0.0)
    with pytest.raises(ScheduleError, match="more than its cap"):
        schedule.resolve(L, N, P, schedule=schedule.keep_ratio(0.3))
