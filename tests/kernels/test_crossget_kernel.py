"""CrossGET's row-max kernel against the plain-PyTorch op, under TRITON_INTERPRET=1 (own process).

The destination maps must be equal: on small-integer inputs every dot product is exact in both
implementations and ties are plentiful (the tie rules are what is tested); on random inputs the
two sides share the formula and the roundings of everything but the dot products' summation order.
Outputs are poisoned before each launch and checked as fully written.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need TRITON_INTERPRET=1 (run by `make test`)", allow_module_level=True)

from tomec import kernels  # noqa: E402
from tomec.ops import crossget_match  # noqa: E402
from tomec.ops.common import inv_norm  # noqa: E402
from tomec.ops.matching import _cosine  # noqa: E402

kernels.load()
from tomec.kernels.crossget import launch_crossget_rowmax  # noqa: E402


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
    sim = _cosine(m, m)
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
