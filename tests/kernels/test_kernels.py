"""Triton kernels against the plain-PyTorch ops, under TRITON_INTERPRET=1 (their own process).

``make test`` runs this folder separately with the variable set before Triton is imported. Outputs are
poisoned before each launch and checked as fully written. Matching inputs are small integers, so
every score is exact in both implementations and ties are plentiful: the maps must be equal. Merge
results follow DESIGN.md's rule: against fp64, the kernel's error is at most twice the error of the
PyTorch op in the same dtype, plus a small floor.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need TRITON_INTERPRET=1 (run by `make test`)", allow_module_level=True)

from tomec.kernels.match import TomePlan, launch_tome_match, plan_tome, run_tome_match  # noqa: E402
from tomec.kernels.merge import MODES, launch_compose_source, launch_merge  # noqa: E402
from tomec.kernels.pitome import PitomePlan, launch_pitome_match, plan_pitome, run_pitome_match  # noqa: E402
from tests.helpers import random_map  # noqa: E402
from tomec import ops  # noqa: E402

# (N, d, protected): odd and even N from 5 to 600, d in {32, 64, 80}, 0-5 protected tokens
MATCH_SHAPES = [
    (5, 32, 0), (6, 64, 1), (9, 80, 2), (16, 32, 5), (17, 64, 1), (33, 80, 0),
    (64, 32, 2), (101, 64, 1), (197, 80, 1), (198, 32, 5), (257, 64, 2), (600, 64, 1),
]
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3}


def integer_metric(batch, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (batch, n, d), generator=g).to(dtype)


def match_rs(n, protected):
    cap = (n - protected) // 2
    return sorted({0, 1, cap // 2, cap})


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


PITOME_SHAPES = [(6, 32, 1), (17, 64, 1), (33, 80, 2), (64, 32, 0), (101, 64, 1), (198, 64, 5)]


@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("n,d,protected", PITOME_SHAPES)
def test_pitome_kernel_equals_torch_on_ties(n, d, protected, bsm):
    # 0/1 keys with four ones of 16 per head-sum: exact cosines; margin 0 keeps the ELU linear,
    # so energies tie exactly in both implementations
    g = torch.Generator().manual_seed(n)
    keys = torch.zeros(2, 1, n, d)
    for b in range(2):
        for i in range(n):
            keys[b, 0, i, torch.randperm(16, generator=g)[:4]] = 1.0
    for r in match_rs(n, protected)[1:]:
        dest = torch.full((2, n), -7, dtype=torch.int64)
        launch_pitome_match(keys, r, protected, 0.0, bsm, dest)
        assert (dest != -7).all()
        assert torch.equal(dest, ops.pitome_match(keys, r, protected, margin=0.0, bsm=bsm)), r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("n,d,protected", [(17, 64, 1), (64, 32, 2), (197, 64, 1)])
def test_pitome_kernel_equals_torch_on_keys(n, d, protected, bsm, dtype):
    keys = torch.randn(2, 4, n, d, generator=torch.Generator().manual_seed(n)).to(dtype)
    for i, r in enumerate(match_rs(n, protected)[1:]):
        # both margins at every r below ViT sizes; at N=197 they alternate over r (interpreter time)
        for margin in (0.75, 0.25) if n < 197 else ((0.75, 0.25)[i % 2],):
            dest = torch.full((2, n), -7, dtype=torch.int64)
            launch_pitome_match(keys, r, protected, margin, bsm, dest)
            assert torch.equal(dest, ops.pitome_match(keys, r, protected, margin=margin, bsm=bsm))


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


PITOME_PLANS = [
    PitomePlan(False, 16, 16, 16, 16, 16, 16), PitomePlan(False, 16, 32, 64, 16, 32, 32),
    PitomePlan(True, 16), PitomePlan(True, 32),
]


def binary_keys(batch, n, d, seed):
    """0/1 keys with four ones of 16: exact cosines, and with margin 0 exact energies (ties)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.zeros(batch, 1, n, d)
    for b in range(batch):
        for i in range(n):
            keys[b, 0, i, torch.randperm(16, generator=g)[:4]] = 1.0
    return keys


@pytest.mark.parametrize("plan", PITOME_PLANS, ids=str)
@pytest.mark.parametrize("n,protected", [(38, 1), (71, 5)])
def test_pitome_kernel_tiles_and_chunks(plan, n, protected):
    keys = binary_keys(2, n, 32, seed=n)
    cap = (n - protected) // 2
    for bsm in (True, False):
        for r in (1, cap // 2, cap):
            dest = torch.full((2, n), -7, dtype=torch.int64)
            run_pitome_match(keys, r, protected, 0.0, bsm, dest, plan)
            assert torch.equal(dest, ops.pitome_match(keys, r, protected, margin=0.0, bsm=bsm)), (bsm, r)


@pytest.mark.parametrize("plan", [PITOME_PLANS[0], PITOME_PLANS[2]], ids=str)
def test_pitome_kernel_tiles_on_float_keys(plan):
    keys = torch.randn(2, 3, 53, 32, generator=torch.Generator().manual_seed(1))
    for bsm, r, margin in ((True, 13, 0.75), (False, 26, 0.25), (True, 26, 0.5)):
        dest = torch.full((2, 53), -7, dtype=torch.int64)
        run_pitome_match(keys, r, 1, margin, bsm, dest, plan)
        assert torch.equal(dest, ops.pitome_match(keys, r, 1, margin=margin, bsm=bsm)), (bsm, r)


def test_pitome_kernel_r_zero_is_the_identity():
    keys = binary_keys(2, 20, 32, seed=3)
    dest = torch.full((2, 20), -7, dtype=torch.int64)
    launch_pitome_match(keys, 0, 1, 0.5, True, dest)
    assert torch.equal(dest, ops.pitome_match(keys, 0, 1, margin=0.5, bsm=True))


def test_matching_kernels_agree_across_launch_configurations():
    """Every tiling plan (A tiles of 16 or 32, B chunks of one to three tiles, per image or spread
    over programs) gives the same map on random float keys, ToMe's and PiToMe's kernels alike.

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
    maps = []
    for plan in PITOME_PLANS + [plan_pitome(2, 70, 1, 17, True)]:
        dest = torch.full((2, 70), -7, dtype=torch.int64)
        run_pitome_match(keys, 17, 1, 0.5, True, dest, plan)
        maps.append(dest)
    assert all(torch.equal(m, maps[0]) for m in maps)


def test_matching_plans_spread_small_batches():
    # batch 1: several programs per image in every launch; from 64 images: one program per image
    assert not plan_tome(1, 197).per_image and plan_tome(256, 197).per_image
    assert not plan_pitome(1, 577, 1, 72, True).per_image and plan_pitome(64, 577, 1, 72, True).per_image
    tiles = plan_tome(1, 577)
    assert tiles.chunk_b % tiles.block_b == 0 and tiles.chunk_b < 577 // 2


def check_rule(fast, plain, exact):
    """DESIGN.md's tolerance rule against the fp64 result."""
    err_fast = (fast.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    floor = FLOOR[fast.dtype] * max(exact.abs().max().item(), 1.0)
    assert err_fast <= 2 * err_plain + floor, (err_fast, err_plain, floor)


# (N, n_out, dropped, C): maps from plain merges to heavy ones, with and without drops
MERGE_SHAPES = [
    (5, 3, 0, 64), (6, 6, 0, 384), (17, 9, 0, 768), (33, 20, 4, 64), (64, 32, 0, 384),
    (101, 60, 10, 64), (197, 150, 0, 384), (198, 99, 0, 768), (257, 200, 20, 64), (600, 400, 0, 64),
]


MERGE_CASES = [
    (*shape, dtype, mode)
    for shape in MERGE_SHAPES
    for dtype in (torch.float32, torch.float16)
    for mode in ("mean", "norm_preserving")
    if mode == "mean" or shape[0] < 400  # the norm epilogue needs no 600-token case
    if shape[0] < 400 or dtype == torch.float32  # one 600-token case (interpreter time)
]


@pytest.mark.parametrize("n,n_out,n_dropped,channels,dtype,mode", MERGE_CASES)
def test_merge_kernel_follows_the_rule(n, n_out, n_dropped, channels, dtype, mode):
    g = torch.Generator().manual_seed(n + channels)
    x64 = torch.randn(2, n, channels, dtype=torch.float64, generator=g)
    size64 = torch.randint(1, 6, (2, n, 1), generator=g).to(torch.float64)
    w64 = torch.rand(2, n, 1, dtype=torch.float64, generator=g) + 0.5
    dest = random_map(2, n, n_out, n_dropped, seed=n)
    for with_size, with_w in ((False, False), (True, False), (True, True)):
        size = size64.to(dtype) if with_size else None
        w = w64.to(dtype) if with_w else None
        out = torch.full((2, n_out, channels), float("nan"), dtype=dtype)  # poison
        size_out = torch.full((2, n_out, 1), float("nan"), dtype=dtype)
        launch_merge(x64.to(dtype), size, dest, w, out, size_out, MODES[mode])
        assert torch.isfinite(out).all() and torch.isfinite(size_out).all(), "unwritten outputs"
        exact, size_exact = ops.merge(
            x64, size64 if with_size else None, dest, n_out, w64 if with_w else None,
            n_dropped=n_dropped, mode=mode,
        )
        plain, _ = ops.merge(x64.to(dtype), size, dest, n_out, w, n_dropped=n_dropped, mode=mode)
        check_rule(out, plain, exact)
        assert torch.equal(size_out.double(), size_exact)


@pytest.mark.parametrize("mode", ["mean", "norm_preserving"])
def test_merge_kernel_keeps_fp64(mode):
    # fp64 tokens are summed in fp64, as the PyTorch op does (fp32 sums would be ~1e-7 off)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 101, 96, dtype=torch.float64, generator=g)
    size = torch.randint(1, 6, (2, 101, 1), generator=g).to(torch.float64)
    w = torch.rand(2, 101, 1, dtype=torch.float64, generator=g) + 0.5
    dest = random_map(2, 101, 60, 10, seed=7)
    out, size_out = torch.empty(2, 60, 96, dtype=torch.float64), torch.empty(2, 60, 1, dtype=torch.float64)
    launch_merge(x, size, dest, w, out, size_out, MODES[mode])
    exact, size_exact = ops.merge(x, size, dest, 60, w, n_dropped=10, mode=mode)
    assert (out - exact).abs().max().item() <= 1e-13 * exact.abs().max().item()
    assert torch.equal(size_out, size_exact)


def sequential_merge(x, size, dest, w, n_out):
    """The merge the kernel's comment promises, one member at a time: each slot sums ``w · x`` of its
    members in increasing position, in fp32 (fp16 tokens widened), then divides by the summed
    weights; sizes summed the same way."""
    batch, n, channels = x.shape
    acc = torch.zeros(batch, n_out, channels)
    weight = torch.zeros(batch, n_out)
    total = torch.zeros(batch, n_out)
    for b in range(batch):
        for i in range(n):  # increasing position
            slot = int(dest[b, i])
            if slot < 0:
                continue
            s = size[b, i, 0].float() if size is not None else torch.tensor(1.0)
            wi = w[b, i, 0].float() if w is not None else s
            acc[b, slot] = acc[b, slot] + wi * x[b, i].float()
            weight[b, slot] = weight[b, slot] + wi
            total[b, slot] = total[b, slot] + s
    return (acc / weight.unsqueeze(-1)).to(x.dtype), total.unsqueeze(-1).to(x.dtype)


def test_merge_kernel_sums_in_a_fixed_order():
    """The merge kernel's bits equal a one-member-at-a-time fp32 sum in increasing position (fp32 and
    fp16 tokens), and do not change with the channel tiling or the batch.

    Launching the kernel twice cannot fail under the interpreter: it runs the programs one after
    another, the same way each time. What makes the kernel deterministic on a GPU is that every slot
    sums its members in one fixed order (no atomics); that order is checked here bit for bit (slots
    of three and more members: another order, a tree sum or an atomic one, rounds differently), and
    so is its independence of the launch: the same tokens padded to 300 channels (three channel
    tiles instead of one) and an image launched alone give the same bits.
    """
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 101, 64, generator=g)
    size = torch.randint(1, 6, (2, 101, 1), generator=g).float()
    w = torch.rand(2, 101, 1, generator=g) + 0.5
    dest = random_map(2, 101, 30, 10, seed=4)
    assert torch.bincount(dest[0][dest[0] >= 0]).max() >= 3  # long sums: their order shows

    def run(x, size, w, dest):
        out = torch.full((x.shape[0], 30, x.shape[2]), float("nan"), dtype=x.dtype)
        size_out = torch.full((x.shape[0], 30, 1), float("nan"), dtype=x.dtype)
        launch_merge(x, size, dest, w, out, size_out)
        return out, size_out

    for dtype in (torch.float32, torch.float16):
        out, size_out = run(x.to(dtype), size.to(dtype), w.to(dtype), dest)
        want, want_size = sequential_merge(x.to(dtype), size.to(dtype), dest, w.to(dtype), 30)
        assert torch.equal(out, want) and torch.equal(size_out, want_size), dtype
    out, _ = run(x, size, w, dest)
    wide = torch.cat([x, torch.randn(2, 101, 236, generator=g)], dim=-1)
    assert torch.equal(run(wide, size, w, dest)[0][..., :64], out)
    assert torch.equal(run(x[1:], size[1:], w[1:], dest[1:])[0], out[1:])


def test_compose_source_kernel():
    source = random_map(3, 120, 50, 6, seed=1)  # an earlier map with drops: N0=120 -> 50 tokens
    dest = random_map(3, 50, 20, 0, seed=2)
    out = torch.full_like(source, -7)
    launch_compose_source(source, dest, out)
    assert torch.equal(out, ops.compose_source(source, dest))


def test_ops_dispatch_to_the_kernels():
    metric, x = integer_metric(2, 50, 32, torch.float32, 0), torch.randn(2, 50, 64)
    dest = ops.bipartite_match(metric, 20, 1, impl="triton")
    assert torch.equal(dest, ops.bipartite_match(metric, 20, 1))
    out, size = ops.merge(x, None, dest, 30, impl="triton")
    ref, ref_size = ops.merge(x, None, dest, 30)
    torch.testing.assert_close(out, ref)
    assert torch.equal(size, ref_size)
    # "auto" on CPU tensors stays with PyTorch, even where the interpreter could run Triton
    assert ops.resolve_impl("auto", x.device) == "torch"


@pytest.mark.parametrize("mode", ["mean", "norm_preserving"])
@pytest.mark.parametrize("n_dropped", [0, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_merge_kernel_gradients_equal_torch(mode, n_dropped, weighted):
    """The Triton merge's registered backward against autograd through the PyTorch merge (fp32)."""
    g = torch.Generator().manual_seed(5)
    batch, n, channels, n_out = 2, 19, 24, 11
    dest = random_map(batch, n, n_out, n_dropped, seed=9)
    x = torch.randn(batch, n, channels, generator=g, requires_grad=True)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float().requires_grad_()
    w = (torch.rand(batch, n, 1, generator=g) + 0.5).requires_grad_() if weighted else None
    inputs = [t for t in (x, size, w) if t is not None]
    upstream = torch.randn(batch, n_out, channels, generator=g)
    grads = {}
    for impl in ("triton", "torch"):
        out, size_out = ops.merge(x, size, dest, n_out, w, n_dropped=n_dropped, mode=mode, impl=impl)
        grads[impl] = torch.autograd.grad((out * upstream).sum() + (size_out**2).sum(), inputs)
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
