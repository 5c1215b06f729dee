"""DiffRate's schedule search: the differentiable kept counts, the masked forward, the search, and the
recorded digits result."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import tomec
from tests.helpers import TOLERANCE, images, make_gated_model, make_model
from tomec import reference
from tomec.train import diffrate as ds
from tomec.bench import digits
from tomec.bench.finetune_diffrate import RESULTS
from tomec.errors import ConfigError


def test_keep_probability_and_expected_count():
    count = ds.KeptCount(6)
    with torch.no_grad():
        count.logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5, -0.2]))
    p = count.logits.softmax(-1)
    candidates = [6, 5, 4, 3, 2, 1]
    expect = [sum(p[c] for c in range(6) if candidates[c] > j) for j in range(6)]
    torch.testing.assert_close(count.keep_probability(), torch.stack(expect))
    mean = sum(c * p[i] for i, c in enumerate(candidates))
    assert count.expected().item() == math.ceil(mean.item())


def test_mask_is_hard_forward_with_a_gradient():
    count = ds.KeptCount(8)
    mask = count.mask(3, 6)
    assert mask.tolist() == [1, 1, 1, 0, 0, 0, 1, 1]
    mask.sum().backward()
    assert count.logits.grad.abs().sum() > 0


def test_merge_tail_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, dtype=torch.float64, generator=g)
    size = torch.randint(1, 3, (2, 9, 1), generator=g).double()
    kept, mid = 3, 7  # patches 3..6 merge into patches 0..2 (positions 1.. after the CLS token)
    out, out_size = ds._merge_tail(x, size, kept, mid)
    for b in range(2):
        members = {d: [d] for d in range(kept)}
        added = {d: 0.0 for d in range(kept)}
        for s in range(kept, mid):
            u = x[b, 1 + s] / x[b, 1 + s].norm()
            sims = [float(u @ (x[b, 1 + d] / x[b, 1 + d].norm())) for d in range(kept)]
            d = max(range(kept), key=lambda i: (sims[i], -i))
            members[d].append(s)
            added[d] += max(float(size[b, 1 + s]) * sims[d], 1.0)
        for d in range(kept):
            mean = torch.stack([x[b, 1 + m] for m in members[d]]).mean(0)
            torch.testing.assert_close(out[b, 1 + d], mean)
            assert out_size[b, 1 + d].item() == pytest.approx(float(size[b, 1 + d]) + added[d])
        assert torch.equal(out[b, 1 + kept :], x[b, 1 + kept :])  # merged ones stay (masked later)


@pytest.mark.parametrize("gated", [False, True])
def test_masked_forward_keeping_everything_is_the_model(gated):
    """Full masks: the search's forward is the unmerged model, a gated attention's gate included
    (the search once ran an attention copy that dropped the gate)."""
    model = (make_gated_model if gated else make_model)("test_vit", depth=3)
    x = images("test_vit", 2)
    prune = torch.nn.ModuleList(ds.KeptCount(100) for _ in range(3))
    merge = torch.nn.ModuleList(ds.KeptCount(100) for _ in range(3))
    for count in (*prune, *merge):
        with torch.no_grad():
            count.logits[0] = 50.0  # all mass on "keep all 100 patches"
    with torch.no_grad():
        logits, macs = ds.masked_forward(model, x, prune, merge, compress_first=True)
        plain = model(x)
    torch.testing.assert_close(logits, plain, rtol=TOLERANCE, atol=TOLERANCE)
    assert macs.item() == pytest.approx(ds.schedule_macs(model, {"prune_kept": [101] * 3,
                                                                 "merge_kept": [101] * 3}))


@pytest.fixture(scope="module")
def digits_setup():
    return digits.load_trained(), digits.digits_data()


def test_search_returns_a_schedule_within_budget(digits_setup):
    model, (x_train, y_train, x_test, y_test) = digits_setup
    before = copy.deepcopy(model.state_dict())
    full = ds.schedule_macs(model, {"prune_kept": [65] * 6, "merge_kept": [65] * 6})
    found = ds.search_diffrate(model, x_train[:256], y_train[:256], target_macs=0.3 * full, steps=4,
                               batch=16, progress=False, compress_first=True)
    assert found["macs"] <= 0.3 * full
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # frozen
    assert all(p.requires_grad for p in model.parameters())  # restored
    be = tomec.backend(method="diffrate", kept=found["kept"], compiler="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=be)(x_test[:8])
    assert be.tokens_per_block[0] == 65 and be.tokens_per_block[-1] < 65


def test_search_moves_the_schedule_toward_the_target(digits_setup):
    """The MACs penalty's gradient reaches the kept counts: before any step every count sits at the
    middle (about 55% of the MACs); 40 steps bring the learned schedule itself (before the final
    scaling) much closer to a 30% target, so it needs less of a correction."""
    model, (x_train, y_train, *_) = digits_setup
    full = ds.schedule_macs(model, {"prune_kept": [65] * 6, "merge_kept": [65] * 6})
    kwargs = dict(target_macs=0.3 * full, batch=16, progress=False, compress_first=True)
    start = ds.search_diffrate(model, x_train[:512], y_train[:512], steps=0, **kwargs)
    found = ds.search_diffrate(model, x_train[:512], y_train[:512], steps=40, **kwargs)
    assert start["learned_macs"] > 0.5 * full
    gap = lambda r: abs(r["learned_macs"] - 0.3 * full)  # noqa: E731
    assert gap(found) < 0.5 * gap(start)
    assert abs(found["scale"] - 1) < abs(start["scale"] - 1)


def test_scale_spends_the_budget_as_learned(digits_setup):
    """The returned schedule is the learned one times one factor: within the budget and within 10%
    of it, whether the learned one was above or below."""
    model, (x_train, y_train, *_) = digits_setup
    full = ds.schedule_macs(model, {"prune_kept": [65] * 6, "merge_kept": [65] * 6})
    for target in (0.2, 0.7):  # the untrained counts (about 55%) are above one and below the other
        found = ds.search_diffrate(model, x_train[:64], y_train[:64], target_macs=target * full,
                                   steps=0, progress=False, compress_first=True)
        assert 0.9 * target * full < found["macs"] <= target * full  # spent, not undercut
        above = found["learned_macs"] > target * full
        assert above == (target == 0.2)
        assert (found["scale"] < 1) == above


def test_geometric_baseline_at_one_half_is_the_halving_schedule(digits_setup):
    """The untrained baseline of the recorded search at rho = 0.5 is r-style [32, 16, 8, 4, 2, 1]."""
    from tomec.bench.finetune_diffrate import geometric_kept
    from tomec.flops import flops_report

    model, _ = digits_setup
    kept = flops_report(model, "diffrate", kept=geometric_kept(0.5))
    plain = flops_report(model, "diffrate", schedule=[32, 16, 8, 4, 2, 1])
    assert kept["schedule"] == plain["schedule"] == [32, 16, 8, 4, 2, 1]
    assert kept["macs"] == plain["macs"]


def test_ste_min_sends_the_gradient_to_both_counts():
    """DiffRate's straight-through min: the value is the smallest, the gradient reaches the block's
    prune and merge counts both, and not the tokens coming in."""
    for n_in_value, smallest in ((20.0, 12.0), (8.0, 8.0)):  # a count is smallest / the input is
        n_in = torch.tensor(n_in_value, requires_grad=True)
        prune, merge = torch.tensor(30.0, requires_grad=True), torch.tensor(12.0, requires_grad=True)
        out = ds._ste_min(n_in, prune, merge)
        assert out.item() == smallest
        out.backward()
        assert prune.grad.item() == 1.0 and merge.grad.item() == 1.0 and n_in.grad is None


def test_search_rejects_an_impossible_target(digits_setup):
    """Before any step: a target outside (0, full], or below one patch token per block (12.4% of the
    MACs with block 0 compressed, 28.6% without)."""
    model, (x_train, y_train, *_) = digits_setup
    full = ds.schedule_macs(model, {"prune_kept": [65] * 6, "merge_kept": [65] * 6})
    slow = dict(steps=10**6, progress=False)  # would take hours if the check came after the search
    with pytest.raises(ConfigError, match="target_macs"):
        ds.search_diffrate(model, x_train, y_train, target_macs=-1.0, **slow)
    with pytest.raises(ConfigError, match="one patch token per block"):
        ds.search_diffrate(model, x_train, y_train, target_macs=0.1 * full, compress_first=True, **slow)
    with pytest.raises(ConfigError, match="compress_first=True lowers it"):
        ds.search_diffrate(model, x_train, y_train, target_macs=0.2 * full, **slow)
    ds.search_diffrate(model, x_train, y_train, target_macs=0.2 * full, compress_first=True,
                       steps=0, progress=False)  # reachable with block 0 compressed


def test_recorded_result_reproduces(digits_setup):
    """Every budget's recorded baseline and first searched schedule give the recorded test accuracy
    and NLL."""
    model, (_, _, x_test, y_test) = digits_setup
    for row in json.loads(RESULTS.read_text())["rows"]:
        for kept, scores in ((row["baseline_kept"], row["baseline"]), (row["searched"][0]["kept"],
                                                                       row["searched"][0])):
            ref = reference.patch(copy.deepcopy(model), method="diffrate", kept=kept)
            got = digits.scores_of(ref, x_test, y_test)
            assert got["accuracy"] == pytest.approx(scores["accuracy"])
            assert got["nll"] == pytest.approx(scores["nll"], rel=1e-4)
        assert all(s["macs_ratio"] <= row["baseline_macs_ratio"] for s in row["searched"])
