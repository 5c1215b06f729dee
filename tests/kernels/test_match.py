"""The bipartite matching kernel (kernels/match.py). Triton kernels against the plain-PyTorch ops, under TRITON_INTERPRET=1 (their own process).

``make test`` runs this folder separately with the variable set before Triton is imported. Outputs are
poisoned before each launch and checked as fully written. Matching inputs are small integers:
every score is exact in both implementations, so the maps must be equal."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need TRITON_INTERPRET=1 (run by `make test`)", allow_module_level=True)

from tomec.kernels.match import TomePlan, launch_tome_match, plan_tome, run_tome_match  # noqa: E402
from tests.kernels.inputs import integer_metric, match_rs  # noqa: E402
from tomec import ops  # noqa: E402


# (N, d, protected): odd and even N from 5 to 600, d in {32, 64, 80}, 0-5 protected tokens
MATCH_SHAPES = [
    (5, 32, 0), (6, 64, 1), (9, 80, 2), (16, 32, 5), (17, 64, 1), (33, 80, 0),
    (64, 32, 2), (101, 64, 1), (197, 80, 1), (198, 32, 5), (257, 64, 2), (600, 64, 1),
]



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d,protected", MATCH_SHAPES)
def test_match_kernel_equals_torch(n, d, protected, dtype):
    batch = 2
    metric = integer_metric(batch, n, d, dtype, seed=n + d)
    for r in match_rs(n, protected):
        dest = torch.full((batch, n), -7, dtype=torch.int64)  # poison
        launch_tome_match(metric, r, protected, dest)
        assert (dest != -7).all(), "kernel left entries unwritten"
        assert torch.equal(dest, ops.bipartite_match(metric, r, protected)), f"r={r}"



@pytest.mark.parametrize("n,protected", [(17, 1), (64, 0), (197, 1)])
def test_match_kernel_random_float_inputs(n, protected):
    metric = torch.randn(2, n, 64, generator=torch.Generator().manual_seed(n))
    for r in match_rs(n, protected):
        dest = torch.full((2, n), -7, dtype=torch.int64)
        launch_tome_match(metric, r, protected, dest)
        assert torch.equal(dest, ops.bipartite_match(metric, r, protected))



@pytest.mark.parametrize("n,protected", [(17, 1), (64, 2), (101, 1)])
def test_match_kernel_drops_sources_like_tofu(n, protected):
    metric = integer_metric(2, n, 32, torch.float32, seed=n)
    for r in match_rs(n, protected):
        dest = torch.full((2, n), -7, dtype=torch.int64)
        launch_tome_match(metric, r, protected, dest, drop_sources=True)
        assert torch.equal(dest, ops.bipartite_match(metric, r, protected, drop_sources=True))



def test_match_kernel_all_tied():
    metric = torch.ones(3, 21, 32)
    for protected in (0, 1, 3):
        for r in match_rs(21, protected):
            dest = torch.full((3, 21), -7, dtype=torch.int64)
            launch_tome_match(metric, r, protected, dest)
            assert torch.equal(dest, ops.bipartite_match(metric, r, protected))



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_match_kernel_on_keys_sums_heads(dtype):
    g = torch.Generator().manual_seed(5)
    qkv = torch.randint(-3, 4, (2, 57, 3, 6, 32), generator=g).to(dtype)
    keys = qkv.permute(2, 0, 3, 1, 4)[1]  # [B, H, N, d], strided like timm's k
    for r in (0, 9, 28):
        dest = torch.full((2, 57), -7, dtype=torch.int64)
        launch_tome_match(keys, r, 1, dest)
        assert torch.equal(dest, ops.bipartite_match(keys, r, 1))
        # the head sum matches like ToMe's head mean (exact here: integer keys, 6 heads)
        assert torch.equal(dest, ops.bipartite_match(keys.double().mean(1), r, 1))



def test_match_kernel_strided_input():
    base = integer_metric(2, 40, 96, torch.float32, seed=3)
    metric = base[..., 16:80]  # a view with row stride 96
    dest = torch.empty(2, 40, dtype=torch.int64)
    launch_tome_match(metric, 12, 1, dest)
    assert torch.equal(dest, ops.bipartite_match(metric.contiguous(), 12, 1))



# Explicit plans at small N: A tiles of 16 and 32, B chunks of one to three tiles (the last one
# partial), and the per-image plan over several tiles, so every tile and chunk boundary is crossed.
TOME_PLANS = [
    TomePlan(False, 16, 16, 16), TomePlan(False, 16, 32, 32), TomePlan(False, 32, 16, 48),
    TomePlan(True, 16, 16), TomePlan(True, 32, 32),
]



@pytest.mark.parametrize("plan", TOME_PLANS, ids=str)
@pytest.mark.parametrize("n,protected", [(70, 1), (71, 5)])
def test_match_kernel_tiles_and_chunks(plan, n, protected):
    metric = integer_metric(2, n, 32, torch.float32, seed=n + protected).unsqueeze(1)
    for r in match_rs(n, protected):
        for drop in (False, True) if r == (n - protected) // 2 else (False,):
            dest = torch.full((2, n), -7, dtype=torch.int64)
            run_tome_match(metric, r, protected, dest, drop, plan)
            assert torch.equal(dest, ops.bipartite_match(metric, r, protected, drop_sources=drop)), (r, drop)



def test_match_kernel_chunks_keep_the_first_maximum():
    # every score ties (identical rows): each partner is the first allowed B token, whichever chunk;
    # two-valued rows tie within and across chunks as well
    g = torch.Generator().manual_seed(0)
    for metric in (torch.ones(2, 1, 70, 32), torch.randint(0, 2, (2, 1, 70, 16), generator=g).float() * 2 - 1):
        for plan in (TomePlan(False, 16, 16, 16), TomePlan(True, 16, 16)):
            for protected, r in ((0, 20), (3, 33), (1, 0)):
                dest = torch.full((2, 70), -7, dtype=torch.int64)
                run_tome_match(metric, r, protected, dest, False, plan)
                assert torch.equal(dest, ops.bipartite_match(metric, r, protected)), (plan, protected, r)



def test_match_kernel_agrees_across_launch_configurations():
    """Every tiling plan (A tiles of 16 or 32, B chunks of one to three tiles, per image or spread
    over programs) gives the same map on random float keys, the bipartite kernel here, PiToMe's in test_pitome.py.

    Launching one plan twice cannot fail under the interpreter: it runs the programs one after
    another, the same way each time. Another plan changes which program scores which pairs and how
    partial maxima meet across chunks; on float keys every score is rounded, so a kernel whose
    decision depended on that (a pair scored with other roundings in another tile, a cross-chunk
    maximum that is not the first, a program reading what another one writes) answers differently
    under some plan. (The tiles tests above check each plan on exact, tied scores.)
    """
    keys = torch.randn(2, 4, 70, 32, generator=torch.Generator().manual_seed(2))
    maps = []
    for plan in TOME_PLANS:
        dest = torch.full((2, 70), -7, dtype=torch.int64)
        run_tome_match(keys, 17, 1, dest, False, plan)
        maps.append(dest)
    assert all(torch.equal(m, maps[0]) for m in maps)
    assert torch.equal(maps[0], ops.bipartite_match(keys, 17, 1))



def test_match_plans_spread_small_batches():
    # batch 1: several programs per image in every launch; from 64 images: one program per image
    assert not plan_tome(1, 197).per_image and plan_tome(256, 197).per_image
    tiles = plan_tome(1, 577)
    assert tiles.chunk_b % tiles.block_b == 0 and tiles.chunk_b < 577 // 2
