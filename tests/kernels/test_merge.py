"""The merge and source-composition kernels (kernels/merge.py). Triton kernels against the plain-PyTorch ops, under TRITON_INTERPRET=1 (their own process).

``make test`` runs this folder separately with the variable set before Triton is imported. Outputs are
poisoned before each launch and checked as fully written. Merge results follow
DESIGN.md's rule: against fp64, the kernel's error is at most twice the error of the PyTorch op in
the same dtype, plus a small floor."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need TRITON_INTERPRET=1 (run by `make test`)", allow_module_level=True)

from tomec.kernels.merge import MODES, launch_compose_source, launch_merge  # noqa: E402
from tests.helpers import random_map  # noqa: E402
from tests.kernels.inputs import integer_metric  # noqa: E402
from tomec import ops  # noqa: E402


FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3}



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
