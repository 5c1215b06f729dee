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


# --- Reduction blocks (methods that reduce only at some blocks: ATC, FPET) ----------------------


def _atc_cap(n, p):
    return max(n - p - 1, 0)


def test_blocks_spread_r_over_the_reduction_blocks_only():
    # the METHODS.md rule over len(blocks) = 3 entries, placed at blocks 3, 6, 9
    assert schedule.spread(100, 3, -0.5) == [50, 33, 17]
    out = schedule.resolve(L, N, P, r=100, blocks=[3, 6, 9], cap=_atc_cap)
    assert out == [0, 0, 0, 50, 0, 0, 33, 0, 0, 17, 0, 0]
    assert schedule.resolve(L, N, P, r=98, blocks=[6], cap=_atc_cap) == [0] * 6 + [98] + [0] * 5
    # order of the given blocks does not matter; the tuple form spreads over the blocks too
    assert schedule.resolve(L, N, P, r=100, blocks=[9, 3, 6], cap=_atc_cap) == out
    assert schedule.resolve(L, N, P, schedule=(10, 0.0), blocks=[3, 6, 9]) == (
        [0, 0, 0, 10, 0, 0, 10, 0, 0, 10, 0, 0]
    )


def test_blocks_excess_moves_to_the_next_reduction_block_with_room():
    # 21 tokens, 1 protected, ToMe's cap: block 1 takes at most 10, block 3 then at most 5
    out = schedule.resolve(4, 21, 1, r=14, inflect=-1.0, blocks=[1, 3])
    assert out == [0, 10, 0, 4]  # spread gives [14, 0]: 4 over block 1's cap move to block 3
    n = 21
    for layer, v in enumerate(out):
        assert v <= (n - 1) // 2 and (v == 0 or layer in (1, 3))
        n -= v


def test_blocks_keep_ratio_only_at_reduction_blocks():
    out = schedule.resolve(L, N, P, schedule=schedule.keep_ratio(0.9), blocks=[3, 6, 9])
    assert out == [0, 0, 0, 19, 0, 0, 17, 0, 0, 16, 0, 0]


def test_blocks_explicit_list():
    good = [0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1]
    assert schedule.resolve(L, N, P, schedule=good, blocks=[3, 11]) == good


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(schedule=[1] + [0] * 11, blocks=[3, 6, 9]), ScheduleError,
         r"schedule\[0\]=1 removes tokens at block 0, which does not reduce: .* blocks \[3, 6, 9\]"),
        (dict(schedule=[0] * 3 + [196] + [0] * 8, blocks=[3], cap=_atc_cap), ScheduleError,
         r"schedule\[3\]=196 exceeds block 3's cap of 195"),
        (dict(r=196, blocks=[3, 6, 9], cap=_atc_cap), ScheduleError,
         r"reduction blocks \[3, 6, 9\] can remove at most 195 of the 196 mergeable tokens"),
        (dict(r=150, blocks=[3, 6]), ScheduleError,
         r"reduction blocks \[3, 6\] can remove at most 147 of the 196"),
        (dict(r=140, inflect=1.0, blocks=[3, 6]), ScheduleError,
         r"later blocks \(reduction blocks \[3, 6\]\), 42 tokens are left over"),
        (dict(r=10, blocks=[3, 12]), ScheduleError, r"block\(s\) \[12\] do not exist; the model has 12"),
        (dict(r=10, blocks=[3, 3]), ConfigError, "name a block twice"),
        (dict(r=10, blocks=[]), ConfigError, "non-empty list"),
        (dict(r=10, blocks=[-1]), ConfigError, r"reduction blocks\[0\] must be a non-negative"),
    ],
)
def test_blocks_errors_name_the_numbers(kwargs, error, match):
    with pytest.raises(error, match=match):
        schedule.resolve(L, N, P, **kwargs)


def test_blocks_from_the_method_through_the_config():
    from tomec.config import TomecConfig

    assert TomecConfig(method="atc", r=100).resolve_schedule(L, N, P) == (
        [0, 0, 0, 50, 0, 0, 33, 0, 0, 17, 0, 0]
    )
    assert TomecConfig(method="atc", r=9, method_options={"blocks": [5, 1]}).resolve_schedule(
        6, 101, 1
    ) == [0, 7, 0, 0, 0, 2]  # spread(9, 2, -0.5) = [7, 2]
    assert TomecConfig(method="fpet", r=98).resolve_schedule(L, N, P)[6] == 98
    with pytest.raises(ScheduleError, match=r"block 1, which does not reduce: .* blocks \[2\]"):
        TomecConfig(method="fpet", schedule=[0, 5, 0, 0]).resolve_schedule(4, 101, 1)


# --- spread: a bisection instead of a loop up to r -------------------------------------------------


def _old_spread(r, num_layers, inflect, total_of):
    """tomec 0.x's spread, the loop over every base up to r, kept as the oracle (``total_of(b)`` is
    ``sum(per_layer(b, inflect, num_layers))``, memoised so that 3000 values of r stay fast)."""
    best_b, best_err, b = 0, r, 0
    while True:
        total = total_of(b)
        err = abs(total - r)
        if err < best_err:
            best_b, best_err = b, err
        if total > r or b > r:
            break
        b += 1
    values = schedule.per_layer(best_b, inflect, num_layers)
    order = range(num_layers) if inflect < 0 else range(num_layers - 1, -1, -1)
    return schedule._push(values, r - sum(values), list(order))


@pytest.mark.parametrize(
    "num_layers,inflect", [(12, -0.5), (12, 0.0), (12, 0.5), (7, -1.0), (24, 1.0), (7, 0.3)]
)
def test_spread_equals_the_old_loop(num_layers, inflect):
    totals = [sum(schedule.per_layer(b, inflect, num_layers)) for b in range(3002)]
    # what the bisection relies on: the total never decreases with the base
    assert all(a <= b for a, b in zip(totals, totals[1:]))
    for r in range(3001):
        assert schedule.spread(r, num_layers, inflect) == _old_spread(
            r, num_layers, inflect, totals.__getitem__
        ), r


def _count_per_layer(monkeypatch, limit):
    calls = []
    real = schedule.per_layer

    def counted(*args):
        calls.append(args)
        assert len(calls) <= limit, f"per_layer called more than {limit} times"
        return real(*args)

    monkeypatch.setattr(schedule, "per_layer", counted)
    return calls


@pytest.mark.parametrize("num_layers,inflect", [(12, -0.5), (1, 0.0), (2, 1.0), (24, -1.0)])
def test_spread_does_not_loop_up_to_r(monkeypatch, num_layers, inflect):
    calls = _count_per_layer(monkeypatch, 40)  # the loop called it once per base: r / L times
    out = schedule.spread(10**7, num_layers, inflect)
    assert sum(out) == 10**7 and len(out) == num_layers and min(out) >= 0
    assert len(calls) <= 40


def test_r_beyond_the_capacity_is_refused_before_it_is_spread(monkeypatch):
    def no_spread(*args, **kwargs):
        raise AssertionError("spread called for an r beyond the capacity")

    monkeypatch.setattr(schedule, "spread", no_spread)
    calls = _count_per_layer(monkeypatch, 0)
    with pytest.raises(ScheduleError, match=r"r=100000000 .* at most 195 of the 196 mergeable"):
        schedule.resolve(L, N, P, r=10**8)
    with pytest.raises(ScheduleError, match=r"r=100000000 .* reduction blocks \[3, 6, 9\]"):
        schedule.resolve(L, N, P, r=10**8, blocks=[3, 6, 9], cap=_atc_cap)
    from tomec.config import TomecConfig

    for method in ("tome", "atc", "fpet", "mctf"):  # every method that spreads r, via the config
        with pytest.raises(ScheduleError, match="r=100000000"):
            TomecConfig(method=method, r=10**8).resolve_schedule(L, N, P)
    assert calls == []
    # an invalid inflect is still named first, not hidden behind the capacity error
    with pytest.raises(ConfigError, match="inflect"):
        schedule.resolve(L, N, P, r=10**8, inflect=2.0)
