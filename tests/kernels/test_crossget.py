"""CrossGET's row-max kernel against the plain-PyTorch op, under TRITON_INTERPRET=1 (own process).

The destination maps must be equal: on small-integer inputs every dot product is exact in both
implementations and ties are plentiful (the tie rules are what is tested); on random inputs the
two sides share the formula and the roundings of everything but the dot products' summation order.
Outputs are poisoned before each launch and checked as fully written.

The kernel cuts the tokens into square tiles (16 or 32) and computes each pair of tiles once, both
ways, into per-column-tile partials combined in column order: the tiled tests below span several
row tiles and column tiles (odd and even tile counts), with ties across tiles, protected tokens
beyond the first tile, rows with no allowed column, and the same answer from either tile size.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need TRITON_INTERPRET=1 (run by `make test`)", allow_module_level=True)

from tomec import kernels  # noqa: E402
from tomec.ops import crossget_match  # noqa: E402

kernels.load()
from tomec.kernels.crossget import launch_crossget_rowmax  # noqa: E402


def inv_norm(t):
    """Inverse row norms, as the op computes them (the zero-norm clamp included)."""
    return 1.0 / t.norm(dim=-1).clamp_min(torch.finfo(t.dtype).tiny)


def cosine(a, b):
    """``(a · b) · inv_a · inv_b``, the op's (and the kernel's) formula, in that order of roundings."""
    return (a @ b.transpose(-1, -2)) * inv_norm(a).unsqueeze(-1) * inv_norm(b).unsqueeze(-2)


def inputs(batch, heads, n, d, dtype, seed, integer):
    """``metric``, ``query`` (``[B, H, N, d]``, or ``[B, N, d]`` for ``heads == 0``) and sizes."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, n, d) if heads == 0 else (batch, heads, n, d)
    if integer:
        metric, query = (torch.randint(-2, 3, shape, generator=g).float() for _ in range(2))
    else:
        metric, query = (torch.randn(shape, generator=g) for _ in range(2))
    size = torch.randint(1, 5, (batch, n, 1), generator=g).to(dtype)
    return metric.to(dtype), query.to(dtype), size


def rs(n, protected):
    cap = (n - protected) // 2
    return sorted({0, 1, cap // 2, cap} & set(range(cap + 1)))


# (N, heads, d): one tile and several (tiles of 32), odd and even N, d padded and split in chunks of 64
SHAPES = [(5, 0, 16), (17, 2, 8), (33, 0, 24), (70, 3, 80)]


@pytest.mark.parametrize("integer", [True, False], ids=["ties", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("protected", [0, 1, 2, 3])
@pytest.mark.parametrize("n,heads,d", SHAPES)
def test_op_triton_equals_torch(n, heads, d, protected, dtype, integer):
    metric, query, size = inputs(2, heads, n, d, dtype, seed=7 * n + protected + d, integer=integer)
    for r in rs(n, protected):
        for guided in (True, False) if protected else (True,):
            want = crossget_match(metric, query, r, protected, size=size, guided=guided)
            got = crossget_match(metric, query, r, protected, size=size, guided=guided, impl="triton")
            assert torch.equal(got[0], want[0]), f"r={r} guided={guided}"
            torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
            assert torch.equal(got[2], want[2])


def test_op_all_tied():
    # every key the same: every similarity 1, every decision by the tie rules
    metric = torch.ones(2, 37, 16)
    for protected in (0, 1):
        for r in rs(37, protected):
            want = crossget_match(metric, metric, r, protected)
            got = crossget_match(metric, metric, r, protected, impl="triton")
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_op_fp64_stays_torch():
    metric, query, size = inputs(2, 0, 20, 16, torch.float64, seed=3, integer=False)
    want = crossget_match(metric, query, 5, 1, size=size)
    got = crossget_match(metric, query, 5, 1, size=size, impl="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def reference_rowmax(metric, row_key, col_key, protected):
    """The op's symmetric masked cosine, materialised: per row, max and first argmax."""
    m = metric.float()
    n = m.shape[1]
    sim = cosine(m, m)
    sim = (sim + sim.transpose(-1, -2)) * 0.5
    idx = torch.arange(n)
    allowed = (idx.view(n, 1) != idx.view(1, n)) & (idx >= protected).view(n, 1) & (idx >= protected).view(1, n)
    allowed = allowed & (col_key.unsqueeze(-2) > row_key.unsqueeze(-1))
    return sim.masked_fill(~allowed, float("-inf")).max(-1)


def key_modes(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    zero = torch.zeros(batch, n, dtype=torch.int64)
    rank = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    non_src = (torch.rand(batch, n, generator=g) < 0.6).to(torch.int64)
    return {"all": (zero - 1, zero), "later": (rank, rank), "non_source": (zero, non_src)}


@pytest.mark.parametrize("integer", [True, False], ids=["ties", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d,protected", [(5, 16, 0), (32, 20, 1), (33, 64, 3), (66, 96, 2)])
def test_rowmax_kernel_poisoned_and_equal(n, d, protected, dtype, integer):
    batch = 2
    metric, _, _ = inputs(batch, 0, n, d, dtype, seed=n + d, integer=integer)
    inv = inv_norm(metric.float())
    for mode, (row_key, col_key) in key_modes(batch, n, seed=n).items():
        best = torch.full((batch, n), float("nan"))  # poison
        arg = torch.full((batch, n), -7, dtype=torch.int64)
        launch_crossget_rowmax(metric, inv, row_key, col_key, protected, best, arg)
        assert not best.isnan().any() and (arg != -7).all(), f"{mode}: entries left unwritten"
        want_best, want_arg = reference_rowmax(metric, row_key, col_key, protected)
        assert torch.equal(arg, want_arg), mode
        if integer:
            assert torch.equal(best, want_best), mode
        else:
            torch.testing.assert_close(best, want_best, rtol=1e-6, atol=1e-6)


def launch(metric, inv, row_key, col_key, protected, block):
    batch, n = metric.shape[:2]
    best = torch.full((batch, n), float("nan"))  # poison
    arg = torch.full((batch, n), -7, dtype=torch.int64)
    launch_crossget_rowmax(metric, inv, row_key, col_key, protected, best, arg, block=block)
    assert not best.isnan().any() and (arg != -7).all(), "entries left unwritten"
    return best, arg


def tiled_modes(batch, n, seed):
    """The three CrossGET key modes, plus keys that allow no column at all (``-inf``, index 0)."""
    modes = key_modes(batch, n, seed)
    zero = torch.zeros(batch, n, dtype=torch.int64)
    modes["none"] = (zero, zero)
    return modes


def repeated_tokens(batch, n, d, dtype, seed):
    """Small-integer tokens (exact dots) with copies, and copies scaled by 2, in later tiles: a row's
    maximum is tied in several column tiles, and the lowest column must win."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-2, 3, (batch, n, d), generator=g).float()
    src = torch.arange(n)
    src[16:32] = torch.arange(16)  # tile 1 repeats tile 0 (tiles of 16)
    src[40:n] = torch.arange(5, 5 + n - 40)  # spans tiles 2 and 3 (and 4)
    scale = torch.ones(n, 1)
    scale[48:] = 2.0  # the same cosine, exactly
    return (base[:, src] * scale).to(dtype)


# (N, d, protected, dtype) at tiles of 16: 4 tiles (even count: the half round of pairs) and 5 (odd);
# 17 protected tokens cover the whole first tile
TILED = [(50, 24, 0, torch.float32), (50, 80, 17, torch.float16), (70, 16, 3, torch.float32)]


@pytest.mark.parametrize("n,d,protected,dtype", TILED)
def test_rowmax_tiled_ties_across_tiles(n, d, protected, dtype):
    batch = 2
    metric = repeated_tokens(batch, n, d, dtype, seed=n + d)
    inv = inv_norm(metric.float())
    for mode, (row_key, col_key) in tiled_modes(batch, n, seed=n + 1).items():
        best, arg = launch(metric, inv, row_key, col_key, protected, block=16)
        want_best, want_arg = reference_rowmax(metric, row_key, col_key, protected)
        assert torch.equal(arg, want_arg), mode
        assert torch.equal(best, want_best), mode
        if mode == "none":
            assert (best == float("-inf")).all() and (arg == 0).all()
        blocked = best == float("-inf")
        assert blocked[:, :protected].all() and (arg[blocked] == 0).all(), mode


def test_rowmax_tiled_all_tied():
    # every similarity 1: each row's first allowed column, whichever tile it lies in
    n, protected = 45, 2
    metric = torch.ones(1, n, 16)
    inv = inv_norm(metric)
    for mode, (row_key, col_key) in tiled_modes(1, n, seed=3).items():
        got = launch(metric, inv, row_key, col_key, protected, block=16)
        want = reference_rowmax(metric, row_key, col_key, protected)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), mode


def test_rowmax_tiles_do_not_change_the_answer_and_are_symmetric():
    """Tiles of 16 and of 32 give the same arguments on random fp32 and the same bits on exact
    inputs; a mutual best pair ties exactly (each pair's dot is computed once).

    Launching one configuration twice cannot fail under the interpreter: it runs the programs one
    after another, the same way each time. Another tile edge changes which program computes which
    pair and how the row maxima combine across column tiles: a kernel whose answer depends on that
    (a cross-tile maximum that is not the first one, a program reading what another one writes, a
    pair scored twice with different roundings) answers differently. On random fp32 the maxima
    themselves may differ in the last bit (a dot product's summation order follows the tile shape,
    on the interpreter's BLAS as on a GPU's MMA), so only the exact inputs compare them bit for bit.
    """
    batch, n, d = 2, 70, 40
    g = torch.Generator().manual_seed(11)
    metric = torch.randn(batch, n, d, generator=g)
    inv = inv_norm(metric)
    for mode, (row_key, col_key) in key_modes(batch, n, seed=5).items():
        small = launch(metric, inv, row_key, col_key, 1, block=16)
        large = launch(metric, inv, row_key, col_key, 1, block=32)
        assert torch.equal(small[1], large[1]), mode
        torch.testing.assert_close(small[0], large[0], rtol=1e-6, atol=1e-6)
        want_best, want_arg = reference_rowmax(metric, row_key, col_key, 1)
        assert torch.equal(small[1], want_arg), mode
        torch.testing.assert_close(small[0], want_best, rtol=1e-6, atol=1e-6)
        if mode == "all":
            best, arg = small
            mutual = arg.gather(1, arg) == torch.arange(n)
            mutual[:, :1] = False
            assert mutual.any()
            assert torch.equal(best[mutual], best.gather(1, arg)[mutual])
    exact = repeated_tokens(batch, n, d, torch.float32, seed=2)
    inv = inv_norm(exact)
    row_key, col_key = key_modes(batch, n, seed=6)["later"]
    small = launch(exact, inv, row_key, col_key, 3, block=16)
    large = launch(exact, inv, row_key, col_key, 3, block=32)
    assert torch.equal(small[0], large[0]) and torch.equal(small[1], large[1])


def test_rowmax_block_checked():
    metric = torch.ones(1, 8, 16)
    zero = torch.zeros(1, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="block"):
        launch_crossget_rowmax(metric, inv_norm(metric), zero, zero, 0, torch.empty(1, 8),
                               torch.empty(1, 8, dtype=torch.int64), block=64)


def test_rowmax_kernel_strided_metric():
    # a non-contiguous metric (one slice of a wider buffer, tokens and channels strided)
    g = torch.Generator().manual_seed(1)
    wide = torch.randint(-2, 3, (2, 3, 45, 40), generator=g).float()
    metric = wide[:, 1, :, ::2]
    inv = inv_norm(metric)
    row_key, col_key = key_modes(2, 45, seed=2)["later"]
    got = torch.ops.tomec.crossget_rowmax(metric, inv, row_key, col_key, 1)
    want = reference_rowmax(metric, row_key, col_key, 1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rowmax_fake_on_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        metric = torch.empty(3, 50, 24, device="cuda")
        inv = torch.empty(3, 50, device="cuda")
        key = torch.empty(3, 50, device="cuda", dtype=torch.int64)
        best, arg = torch.ops.tomec.crossget_rowmax(metric, inv, key, key, 1)
    assert best.shape == arg.shape == (3, 50)
    assert best.dtype == torch.float32 and arg.dtype == torch.int64 and best.device.type == "cuda"
