"""ATC's clustering kernel against the plain-PyTorch op ``tomec::atc_cluster``, under TRITON_INTERPRET=1.

The labels must be equal exactly (they are discrete decisions): random and tie-heavy (integer-valued)
distances, fp32/fp16/fp64, r = 0, 1, mid and T - 1, one and several row-minimum tiles (ties across
tiles), non-contiguous inputs, and through ``atc_match`` with protected tokens. The kernel's cached row
minima are stressed by hubs (a merged pair that is every other row's nearest: every cache stale,
exact ties at the new linkage on both sides of the hub's column), points on an integer line (a new
linkage equal to a row's minimum at an earlier column, which must keep it), groups at inf distance
(inf row minima beside finite ones, then an all-inf matrix), T = 1 to 4 with every merge count, and
repeated runs. Outputs are poisoned before each launch and checked as fully written.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need TRITON_INTERPRET=1 (run by `make test`)", allow_module_level=True)

from tomec.kernels.atc import launch_atc_cluster  # noqa: E402
from tomec.ops import atc_match  # noqa: E402
from tomec.methods.atc import atc_cluster  # noqa: E402

POISON = -7


def merges(t):
    return sorted({0, 1, t // 2, t - 1})


def check(dist, r, block_r=None, partition=True, linkage="average"):
    out = torch.full(dist.shape[:2], POISON, dtype=torch.int64)
    launch_atc_cluster(dist, r, out, block_r=block_r, linkage=linkage)
    assert (out != POISON).all()  # every element written
    expected = atc_cluster(dist, r, linkage)
    assert torch.equal(out, expected), (r, out, expected)
    t = dist.shape[1]
    assert not partition or all(set(row.tolist()) == set(range(t - r)) for row in out)  # T - r clusters, 0-based


def random_dist(batch, t, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, t, t, generator=g, dtype=torch.float64).to(dtype)


def integer_dist(batch, t, dtype, seed, high=4):
    """Few distinct values: many exactly equal linkages, decided by the row-major tie rule."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, t, t), generator=g).to(dtype)


@pytest.mark.parametrize("t,batch,dtype", [(5, 3, torch.float32), (17, 2, torch.float32),
                                           (40, 2, torch.float32), (23, 2, torch.float16),
                                           (12, 2, torch.float64)])
def test_random_distances(t, batch, dtype):
    dist = random_dist(batch, t, dtype, seed=t)
    for r in merges(t):
        check(dist, r)


@pytest.mark.parametrize("t,dtype,high", [(9, torch.float32, 2), (31, torch.float32, 4),
                                          (40, torch.float32, 3), (26, torch.float16, 3)])
def test_tie_heavy_distances(t, dtype, high):
    dist = integer_dist(3, t, dtype, seed=t + high, high=high)
    for r in merges(t):
        check(dist, r)


@pytest.mark.parametrize("block_r", [2, 8])
def test_several_row_minimum_tiles_keep_the_first_minimum(block_r):
    """Row-minimum tiles of 2 and 8 rows: every row keeps the first column of its minimum."""
    t = 21
    for dist in (integer_dist(2, t, torch.float32, seed=5, high=2), torch.ones(2, t, t),
                 random_dist(2, t, torch.float32, seed=6)):
        for r in merges(t):
            check(dist, r, block_r=block_r)


def test_reads_the_upper_triangle_of_non_contiguous_input():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(2, 19, 19, generator=g)
    dist = base.transpose(1, 2)  # not symmetric, not contiguous: only i < j counts
    assert not dist.is_contiguous()
    for r in (3, 18):
        check(dist, r)
    wide = torch.rand(2, 19, 40, generator=g)[:, :, 3:22]  # a slice with row stride 40
    check(wide, 9)


def test_all_inf_distances_match_the_degenerate_torch_path():
    """An all-inf matrix: the flattened argmin is (0, 0), as in PyTorch (no live finite pair): the
    kernel follows the PyTorch op even there (point 0's cluster dies: label -1)."""
    dist = torch.full((1, 6, 6), float("inf"))
    for r in (1, 3):
        check(dist, r, partition=False)


@pytest.mark.parametrize("n,protected,heads", [(24, 0, 0), (25, 1, 3), (38, 2, 0)])
def test_through_the_op_layer(n, protected, heads):
    g = torch.Generator().manual_seed(n)
    shape = (2, heads, n, 8) if heads else (2, n, 8)
    metric = torch.randn(*shape, generator=g)
    t = n - protected
    for r in merges(t):
        got = atc_match(metric, r, protected, impl="triton")
        assert torch.equal(got, atc_match(metric, r, protected)), r
    # tie-heavy: repeated feature rows give exactly equal cosine distances
    rows = torch.randn(4, 8, generator=g)
    metric = rows[torch.randint(0, 4, (2, n), generator=g)]
    for r in merges(t):
        assert torch.equal(atc_match(metric, r, protected, impl="triton"), atc_match(metric, r, protected)), r


def hub_dist(batch, t, hub, seed, dtype=torch.float32):
    """Integer distances in {2, 3, 4} and a pair (hub, hub + 1) at distance 0 that is every other
    point's nearest (1 and 3 away): the first merge leaves every row stale at the exact linkage 2,
    tied with the row's own 2s before and after the hub's column."""
    g = torch.Generator().manual_seed(seed)
    dist = torch.randint(2, 5, (batch, t, t), generator=g).to(torch.float64)
    dist[:, hub, :] = dist[:, :, hub] = 1.0
    dist[:, hub + 1, :] = dist[:, :, hub + 1] = 3.0
    dist[:, hub, hub + 1] = 0.0
    return dist.to(dtype)


@pytest.mark.parametrize("t,hub,dtype", [(13, 0, torch.float32), (14, 6, torch.float64),
                                         (15, 12, torch.float16)])
def test_a_hub_invalidates_every_cached_minimum(t, hub, dtype):
    dist = hub_dist(2, t, hub, seed=t, dtype=dtype)
    for r in (1, 2, t // 2, t - 1):
        check(dist, r)


def line_dist(batch, t, seed, dtype=torch.float32):
    """Points on a coarse integer line, ``d = |x_a - x_b|``: exact ties everywhere, and merged pairs
    whose new linkage (an exact mean) equals a row's minimum at a column before theirs (that row
    must keep its column)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, t // 2, (batch, t), generator=g).to(torch.float64)
    return (x[:, :, None] - x[:, None, :]).abs().to(dtype)


@pytest.mark.parametrize("seed,dtype", [(0, torch.float32), (4, torch.float32), (1, torch.float64)])
def test_a_tie_at_the_merged_column_keeps_an_earlier_cached_one(seed, dtype):
    t = 12
    dist = line_dist(2, t, seed, dtype)
    for r in (t // 2, 3 * t // 4, t - 1):
        check(dist, r)


def test_groups_at_inf_distance_then_an_all_inf_matrix():
    """Two groups with inf between them: rows with an inf minimum beside finite ones, then (once each
    group is one cluster) the degenerate (0, 0) steps of PyTorch's flattened argmin."""
    g = torch.Generator().manual_seed(3)
    t = 11
    dist = torch.randint(0, 3, (2, t, t), generator=g).float()
    group = torch.arange(t) % 3 == 1
    dist[:, group[:, None] != group[None, :]] = float("inf")
    for r in (3, t - 3, t - 1):
        check(dist, r, partition=False)


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_tiny_t_every_merge_count(t):
    for dist in (random_dist(2, t, torch.float32, seed=t), integer_dist(2, t, torch.float32, seed=t, high=2)):
        for r in range(t):
            check(dist, r)


def test_repeated_runs_and_tilings_give_the_same_labels():
    dist = integer_dist(2, 24, torch.float32, seed=9, high=3)
    first = None
    for block_r in (None, None, 4):
        out = torch.full((2, 24), POISON, dtype=torch.int64)
        launch_atc_cluster(dist, 23, out, block_r=block_r)
        if first is None:
            first = out.clone()
        assert torch.equal(out, first), block_r
    assert torch.equal(first, atc_cluster(dist, 23, "average"))


@pytest.mark.parametrize("linkage", ["complete", "single"])
@pytest.mark.parametrize("t,dtype", [(17, torch.float32), (23, torch.float16), (12, torch.float64)])
def test_complete_and_single_linkage(t, dtype, linkage):
    from tomec.kernels.atc import LINKAGES
    from tomec.methods.atc import LINKAGES as OP_LINKAGES

    assert LINKAGES == OP_LINKAGES  # the kernel's LINKAGE code is the index in this tuple
    for dist in (random_dist(2, t, dtype, seed=t), integer_dist(2, t, dtype, seed=t)):
        for r in merges(t):
            check(dist, r, linkage=linkage)
