"""FPET: the checkerboard matching against its oracle (fp64, exact), properties, the straight-through
gradient, model parity, errors (the adapter's training: tests/train/test_fpet.py)."""

from __future__ import annotations

import pytest
import torch

import tomec
from tests.helpers import check_parity, images, make_model, tie_metric
from tests.oracles import fpet as fpet_oracle
from tests.oracles import tome as tome_oracle
from tomec.config import TomecConfig
from tomec.errors import ConfigError, ScheduleError
from tomec.methods.fpet import BINARY_LEVEL, binarize, fpet_cap, fpet_match, fpet_sides, load_adapter
from tomec.train.fpet import FpetAdapter

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
        assert w is None and (r == 0 or torch.equal(size, torch.ones(2, n, 1, dtype=metric.dtype)))  # no ties


@pytest.mark.parametrize("n,protected", [(16, 0), (26, 1), (30, 5), (50, 1)])
def test_ties_equal_oracle(n, protected):
    metric = tie_metric(3, n, seed=n)
    for r in rs(n, protected):
        dest, _, size = fpet_match(metric, r, protected)
        want, tied = fpet_oracle.fpet_match(metric, r, protected, with_tied=True)
        assert torch.equal(dest, want)
        if r == 0:
            continue
        # the official tie rule: a source whose two best scores are equal is dropped (size 0 here)
        for b in range(3):
            assert {i for i in range(n) if size[b, i, 0] == 0} == tied[b]
        if r == fpet_cap(n, protected):
            assert any(tied), "the case has ties"


def test_a_tied_source_is_dropped_not_merged():
    # token 1's two B candidates are equally similar: the official hard assignment (score > mean of
    # the top two) picks neither, so it leaves the sequence without adding to any token
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.0, 1.0]]], dtype=torch.float64)
    # 2x2 grid after the CLS: A = positions 0, 3 (tokens 1, 4), B = positions 2, 1 (tokens 3, 2)
    x = torch.arange(10, dtype=torch.float64).view(1, 5, 2)
    out = tomec.methods.merge_step(x, None, None, metric, method="fpet", r=2, protected=1, layer=0,
                                   num_layers=1)
    assert out[1][0, :, 0].tolist() == [1.0, 1.0, 2.0]  # token 4 joined token 2; token 1 is gone
    torch.testing.assert_close(out[0][0, 1], x[0, 3])
    torch.testing.assert_close(out[0][0, 2], (x[0, 2] + x[0, 4]) / 2)


def _adapter(d, seed=0, scale=0.5):
    adapter = FpetAdapter(d, seed=seed).double()
    with torch.no_grad():  # a trained adapter's weights are far from the init's 1e-3
        adapter.up.mul_(scale / 1e-3)
    return adapter.eval()


def test_adapter_changes_the_match_and_equals_the_oracle():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, 50, 8, dtype=torch.float64, generator=g)
    weights = load_adapter(_adapter(8))
    for r in (5, 24):
        dest, _, _ = fpet_match(keys, r, 1, **weights)
        assert torch.equal(dest, fpet_oracle.fpet_match(keys.mean(1), r, 1, weights["down"], weights["up"]))
    assert not torch.equal(dest, fpet_match(keys, 24, 1)[0])  # the adapter changes partners


def test_binarized_weights_are_the_official_ones(tmp_path):
    w = torch.randn(32, 64, dtype=torch.float64)
    want = w.std() * BINARY_LEVEL * torch.sign(w - w.mean()) + w.mean()
    torch.testing.assert_close(binarize(w), want, rtol=1e-12, atol=1e-12)
    assert abs(BINARY_LEVEL - 0.6744897501960817) < 1e-7  # Φ⁻¹(3/4), in fp32
    adapter = FpetAdapter(16, seed=1)
    path = adapter.save(tmp_path / "a.pt")
    official = {"adapter_down.weight": adapter.down.detach(), "adapter_up.weight": adapter.up.detach()}
    for form in (adapter, str(path), official):
        got = load_adapter(form)
        torch.testing.assert_close(got["down"], binarize(adapter.down.detach()))
        torch.testing.assert_close(got["up"], binarize(adapter.up.detach()))
    with pytest.raises(ConfigError, match="must hold 'down' and 'up'"):
        load_adapter({"w": torch.zeros(2, 2)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_adapter(str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match=r"must be down \[h, d\] and up \[d, h\]"):
        load_adapter({"down": torch.zeros(4, 8), "up": torch.zeros(4, 8)})
    with pytest.raises(ConfigError, match="8-wide keys, the model's attention heads are 32 wide"):
        tomec.reference.patch(make_model("test_vit"), "fpet", r=50, adapter=FpetAdapter(8))(images("test_vit", 1))
    with pytest.warns(UserWarning, match="no refinement adapter given"):
        TomecConfig(method="fpet", r=50)


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


def test_straight_through_forward_is_the_hard_merge_and_the_adapter_gets_a_gradient():
    g = torch.Generator().manual_seed(0)
    n, protected, r = 50, 1, 20
    keys = torch.randn(2, 3, n, 8, generator=g)
    x = torch.randn(2, n, 16, generator=g)
    size = torch.randint(1, 3, (2, n, 1), generator=g).float()
    weights = {k: v.float() for k, v in load_adapter(_adapter(8)).items()}

    def step(params):
        return tomec.methods.merge_step(x, size, None, keys, method="fpet", r=r, protected=protected,
                                        layer=6, num_layers=12, params=params)

    with torch.no_grad():
        hard_x, hard_size, _ = step(weights)
    leaf = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    soft_x, soft_size, _ = step(leaf)
    assert torch.equal(soft_x, hard_x) and torch.equal(soft_size, hard_size)  # bit for bit
    (soft_x * torch.randn(soft_x.shape, generator=g)).sum().backward()
    for t in leaf.values():  # the keys are detached, as in the official code: only the adapter learns
        assert t.grad is not None and t.grad.abs().sum() > 0 and torch.isfinite(t.grad).all()


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
         r"197 patches, which is not a square grid .* a 14x14 patch grid, give protect=2;"),
        # a 10x8 grid without prefix tokens: no protect= value helps, and the message says so
        (lambda: TomecConfig(method="fpet", r=9).resolve_schedule(12, 80, 0), ConfigError,
         r"80 patches, which is not a square grid \(side 8 gives 64\), and no protect= value .* "
         r"FPET needs a square patch grid, and this model's 80 tokens leave none"),
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


def test_model_parity_with_an_adapter():
    adapter = _adapter(32, seed=2).float()
    _, _, be, _, _ = check_parity("test_vit", True, 2, True, method="fpet", r=50, adapter=adapter)
    assert be.schedule == [0, 0, 0, 50, 0, 0]


@pytest.mark.parametrize(
    "n,protected,suggested",
    [(197, 0, 1), (198, 1, 2), (196, 1, 0), (12, 1, 3), (31, 5, 6), (80, 0, None), (80, 2, None),
     (3, 0, None), (10**4 + 40, 1, None)],
)
def test_grid_error_suggests_only_a_protect_value_that_leaves_a_square(n, protected, suggested):
    from tomec.methods.fpet import FPET_MAX_PREFIX, fpet_grid

    with pytest.raises(ConfigError) as info:
        fpet_grid(n, protected)
    message = str(info.value)
    assert f"{n} tokens with {protected} protected leave {n - protected} patches" in message
    assert "so that the rest is a square" not in message  # the old advice, which no value could meet
    if suggested is None:
        assert "give protect=" not in message and f"this model's {n} tokens leave none" in message
        assert not any(
            int((n - p) ** 0.5) ** 2 == n - p and n - p >= 4 for p in range(min(n, FPET_MAX_PREFIX + 1))
        )
    else:
        side = int((n - suggested) ** 0.5)
        assert side * side == n - suggested
        assert f"a {side}x{side} patch grid, give protect={suggested};" in message
        assert fpet_grid(n, suggested) == side  # the advice works
