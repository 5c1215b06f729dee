"""FPET: the checkerboard matching against its oracle (fp64, exact), properties, the straight-through
gradient, model parity, errors."""

from __future__ import annotations

import pytest
import torch

import tomec
from tests.helpers import check_parity, tie_metric
from tests.oracles import fpet as fpet_oracle
from tests.oracles import tome as tome_oracle
from tomec import methods
from tomec.config import TomecConfig
from tomec.errors import ConfigError, ScheduleError
from tomec.ops.fpet import fpet_cap, fpet_match, fpet_sides

SHAPES = [(side * side + p, p) for side in (1, 2, 3, 4, 5, 6) for p in (0, 1, 5)] + [(11, 2), (20, 4)]


def rs(n, protected):
    cap = fpet_cap(n, protected)
    return sorted({0, min(1, cap), cap // 2, cap})


@pytest.mark.parametrize("n,protected", SHAPES)
def test_equals_oracle(n, protected):
    metric = torch.randn(2, n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    for r in rs(n, protected):
        dest, w, size = fpet_match(metric, r, protected)
        assert torch.equal(dest, fpet_oracle.fpet_match(metric, r, protected)), r
        assert w is None and size is None


@pytest.mark.parametrize("n,protected", [(16, 0), (26, 1), (30, 5), (50, 1)])
def test_ties_equal_oracle(n, protected):
    metric = tie_metric(3, n, seed=n)
    for r in rs(n, protected):
        assert torch.equal(fpet_match(metric, r, protected)[0], fpet_oracle.fpet_match(metric, r, protected))


def test_checkerboard_split_and_cap():
    side_a, side_b = fpet_sides(4)
    assert side_a == (0, 2, 8, 10, 5, 7, 13, 15)  # (even, even) then (odd, odd), row-major
    assert side_b == (4, 6, 12, 14, 1, 3, 9, 11)  # (odd row, even col) then (even row, odd col)
    assert fpet_sides(3) == ((0, 2, 6, 8, 4), (3, 5, 1, 7))
    assert fpet_cap(197, 1) == 98 and fpet_cap(10, 1) == 5 and fpet_cap(2, 1) == 0


@pytest.mark.parametrize("n,protected", [(17, 1), (30, 5), (36, 0)])
def test_properties(n, protected):
    metric = torch.randn(3, n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(n + 1))
    g = torch.Generator().manual_seed(n + 2)
    x = torch.randn(3, n, 4, dtype=torch.float64, generator=g)
    size = torch.randint(1, 4, (3, n, 1), generator=g).to(torch.float64)
    for r in rs(n, protected):
        dest, _, _ = fpet_match(metric, r, protected)
        n_out = n - r
        for b in range(3):
            assert sorted(set(dest[b].tolist())) == list(range(n_out))
            assert dest[b, :protected].tolist() == list(range(protected))
            assert bool((dest[b, protected:] >= protected).all())
        x_out, size_out = tomec.ops.merge(x, size, dest, n_out)
        assert torch.equal(size_out.sum(1), size.sum(1))
        assert torch.allclose(x_out[:, :protected], x[:, :protected], rtol=1e-15, atol=0)  # x·s/s
        x_ref, size_ref = tome_oracle.merge(x, size, dest, n_out)
        assert torch.allclose(x_out, x_ref, rtol=1e-12, atol=1e-12) and torch.equal(size_out, size_ref)
    assert torch.equal(fpet_match(metric, 0, protected)[0], torch.arange(n).expand(3, n))


def test_straight_through_forward_is_the_hard_merge_and_the_metric_gets_a_gradient():
    g = torch.Generator().manual_seed(0)
    n, protected, r = 50, 1, 20
    keys = torch.randn(2, 3, n, 8, generator=g)
    x = torch.randn(2, n, 16, generator=g)
    size = torch.randint(1, 3, (2, n, 1), generator=g).float()

    def step(keys):
        return tomec.methods.merge_step(x, size, None, keys, method="fpet", r=r, protected=protected,
                                        layer=6, num_layers=12)

    with torch.no_grad():
        hard_x, hard_size, _ = step(keys)
    leaf = keys.clone().requires_grad_(True)
    soft_x, soft_size, _ = step(leaf)
    assert torch.equal(soft_x, hard_x) and torch.equal(soft_size, hard_size)  # bit for bit
    (soft_x * torch.randn(soft_x.shape, generator=g)).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert torch.isfinite(leaf.grad).all()


def test_default_block_and_option():
    assert TomecConfig(method="fpet", r=98).resolve_schedule(12, 197, 1) == [0] * 6 + [98] + [0] * 5
    assert TomecConfig(method="fpet", r=40, method_options={"block": 1}).resolve_schedule(6, 101, 1) == (
        [0, 40, 0, 0, 0, 0]
    )


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: fpet_match(torch.randn(1, 12, 4), 1, 1), ConfigError,
         r"12 tokens with 1 protected leave 11 patches, which is not a square grid"),
        (lambda: fpet_match(torch.randn(1, 17, 4), 9, 1), ConfigError, r"r=9 is outside \[0, 8\] for 17"),
        (lambda: fpet_match(torch.randn(17, 4), 1, 1), ConfigError, "metric must be"),
        (lambda: TomecConfig(method="fpet", r=5, method_options={"block": -1}), ConfigError, "block must be"),
        (lambda: TomecConfig(method="fpet", r=99).resolve_schedule(12, 197, 1), ScheduleError,
         r"reduction blocks \[6\] can remove at most 98 of the 196"),
        (lambda: TomecConfig(method="fpet", r=9).resolve_schedule(12, 198, 1), ConfigError,
         "197 patches, which is not a square"),
        (lambda: TomecConfig(method="fpet", r=9, method_options={"block": 12}).resolve_schedule(12, 197, 1),
         ScheduleError, r"block\(s\) \[12\] do not exist"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# one case here (the suite is short on CPU); test_coverage/test_frameworks add more models
@pytest.mark.parametrize("fused,batch,prop_attn", [(False, 2, True)])
def test_model_parity(fused, batch, prop_attn):
    _, _, be, _, _ = check_parity("test_vit", fused, batch, prop_attn, method="fpet", r=50,
                                  trace_source=True)
    assert be.schedule == [0, 0, 0, 50, 0, 0]


def test_default_block_is_the_middle_one():
    assert methods.get("fpet").reduction_blocks(6, {"block": None}) == [3]
