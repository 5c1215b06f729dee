"""The shared merge and source composition against the loop oracles, low precision against fp64,
determinism, clear errors."""

from __future__ import annotations


import pytest
import torch

from tests.helpers import random_map, uninitialized_memory_poisoned
from tests.oracles import tome as oracle
from tomec import ops
from tomec.errors import ConfigError, UnsupportedDtypeError


@pytest.mark.parametrize("n,n_out,n_dropped", [(7, 7, 0), (7, 4, 0), (12, 5, 3), (30, 1, 0), (40, 20, 20)])
@pytest.mark.parametrize("weighted", [False, True])
def test_merge_equals_oracle(n, n_out, n_dropped, weighted):
    g = torch.Generator().manual_seed(n + n_out)
    x = torch.randn(3, n, 6, dtype=torch.float64, generator=g)
    size = torch.randint(1, 5, (3, n, 1), generator=g).to(torch.float64)
    w = torch.rand(3, n, 1, dtype=torch.float64, generator=g) + 0.1 if weighted else None
    dest = random_map(3, n, n_out, n_dropped, seed=n)
    x_out, size_out = ops.merge(x, size, dest, n_out, w, n_dropped=n_dropped)
    x_ref, size_ref = oracle.merge(x, size, dest, n_out, w)
    # Same values, summed in another order: equal up to fp64 rounding.
    torch.testing.assert_close(x_out, x_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(size_out, size_ref)



@pytest.mark.parametrize("n,protected,r", [(17, 1, 8), (64, 1, 20), (33, 5, 3)])
def test_matching_then_merge_equals_oracle(n, protected, r):
    metric = torch.randn(2, n, 8, dtype=torch.float64)
    x = torch.randn(2, n, 5, dtype=torch.float64)
    dest = ops.bipartite_match(metric, r, protected)
    x_out, size_out = ops.merge(x, None, dest, n - r)
    x_ref, size_ref = oracle.merge(x, None, oracle.bipartite_match(metric, r, protected), n - r)
    torch.testing.assert_close(x_out, x_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(size_out, size_ref)
    assert torch.equal(x_out[:, :protected], x[:, :protected])  # protected tokens untouched, first
    assert (size_out.sum(1) == n).all()



def test_compose_source_equals_oracle():
    n, source_ref, source = 40, None, None
    x = torch.randn(2, n, 4, dtype=torch.float64)
    size = None
    for r in (10, 7, 5):
        dest = ops.bipartite_match(torch.randn(2, x.shape[1], 4, dtype=torch.float64), r, 1)
        source = ops.compose_source(source, dest)
        source_ref = oracle.compose_source(source_ref, dest)
        x, size = ops.merge(x, size, dest, x.shape[1] - r)
        assert torch.equal(source, source_ref)
    # the source map agrees with the sizes: each final token holds as many originals as its size
    for b in range(2):
        counts = torch.bincount(source[b], minlength=x.shape[1]).to(size.dtype)
        assert torch.equal(counts, size[b, :, 0])
    # and with dropped tokens, -1 stays -1
    dest = torch.tensor([[0, -1, 1, 1]])
    assert oracle.compose_source(torch.tensor([[0, 1, 2, 3, 3]]), dest).tolist() == [[0, -1, 1, 1, 1]]
    assert ops.compose_source(torch.tensor([[0, 1, 2, 3, 3]]), dest).tolist() == [[0, -1, 1, 1, 1]]



DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]



@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_merge_low_precision_against_fp64(dtype, atol, rtol):
    x = torch.randn(2, 50, 16, dtype=torch.float64)
    dest = ops.bipartite_match(torch.randn(2, 50, 8), 20, 1)
    ref, size_ref = ops.merge(x, None, dest, 30)
    out, size = ops.merge(x.to(dtype), None, dest, 30)
    assert out.dtype == dtype and size.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    assert torch.equal(size.double(), size_ref)



def test_ops_are_deterministic():
    """Two merge steps (matching, merge with sizes, source map) give the same bits when run again
    with every uninitialized allocation poisoned and from inputs in other memory layouts.

    Calling the same op twice in one process cannot fail on CPU: nothing in it races, and memory
    an op forgot to write usually holds the same stale values on the second call. Here the second
    run (1) poisons such memory (NaN, or the largest integer: an op that reads memory it never wrote
    answers differently, or NaN) and makes torch raise on any op it knows to be nondeterministic;
    (2) takes the keys strided as timm's ``qkv.unbind`` gives them (the first run: contiguous) and
    the tokens with a channel-major layout. The keys are small integers, so every score is exact
    and the maps cannot depend on how a layout orders a sum.
    """
    g = torch.Generator().manual_seed(0)
    qkv = torch.randint(-3, 4, (4, 197, 3, 6, 64), generator=g).float()
    keys = qkv.permute(2, 0, 3, 1, 4)[1]  # [B, H, N, d], strided
    keys2 = torch.randint(-3, 4, (4, 6, 157, 64), generator=g).float()
    x = torch.randn(4, 197, 384, generator=g)

    def run(keys, keys2, x):
        dest = ops.bipartite_match(keys, 40, 1)
        x1, size1 = ops.merge(x, None, dest, 157)
        dest2 = ops.bipartite_match(keys2, 30, 1, drop_sources=True)
        x2, size2 = ops.merge(x1, size1, dest2, 127, n_dropped=30)
        return dest, x1, size1, dest2, x2, size2, ops.compose_source(dest, dest2)

    first = run(keys.contiguous(), keys2, x)
    with uninitialized_memory_poisoned():
        again = run(keys, keys2.transpose(0, 1).contiguous().transpose(0, 1),
                    x.transpose(1, 2).contiguous().transpose(1, 2))
    for name, a, b in zip(("dest", "x", "size", "dest2", "x2", "size2", "source"), first, again):
        assert torch.equal(a, b), name
        assert not (a.is_floating_point() and a.isnan().any()), name



def test_bad_inputs_are_clear_errors():
    with pytest.raises(UnsupportedDtypeError, match="int64"):
        ops.bipartite_match(torch.ones(1, 5, 4, dtype=torch.int64), 1, 0)
    with pytest.raises(UnsupportedDtypeError, match="int32"):
        ops.merge(torch.ones(1, 5, 4, dtype=torch.int32), None, torch.zeros(1, 5, dtype=torch.int64), 1)
    with pytest.raises(ConfigError, match=r"r=3 is outside \[0, 2\]"):
        ops.bipartite_match(torch.randn(1, 6, 4), 3, 1)
    with pytest.raises(ConfigError, match="impl='cuda'"):
        ops.bipartite_match(torch.randn(1, 6, 4), 1, 1, impl="cuda")
    with pytest.raises(ConfigError, match="cannot merge 5 tokens into 6"):
        ops.merge(torch.randn(1, 5, 4), None, torch.zeros(1, 5, dtype=torch.int64), 6)
