"""ToFu: pruning and the norm-preserving merge against their oracles, which blocks prune."""

from __future__ import annotations


import pytest
import torch

import tomec
from tests.oracles import tome as tome_oracle
from tomec import methods, ops
from tomec.errors import ConfigError


SHAPES = [(5, 0), (6, 1), (17, 1), (18, 2), (33, 5), (64, 1)]



def rs(n, protected):
    cap = (n - protected) // 2
    return sorted({0, 1, cap // 2, cap})



@pytest.mark.parametrize("n,protected", SHAPES)
def test_tofu_pruning_equals_oracle(n, protected):
    metric = torch.randn(2, n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    for r in rs(n, protected):
        dest = ops.bipartite_match(metric, r, protected, drop_sources=True)
        assert torch.equal(dest, tome_oracle.bipartite_match(metric, r, protected, drop_sources=True))
        assert (dest == -1).sum(1).eq(r).all()
        kept = ops.bipartite_match(metric, r, protected)
        assert torch.equal(torch.where(dest >= 0, dest, kept), kept)  # the other slots stay



def test_tofu_prunes_blocks_up_to_half_the_depth():
    # the public code (PiToMe's port, OpenToMe): merge when layer > L // 2
    assert [methods.tofu_prunes(i, 12) for i in range(12)] == [True] * 7 + [False] * 5
    assert [methods.tofu_prunes(i, 7) for i in range(7)] == [True] * 4 + [False] * 3
    assert [methods.tofu_prunes(i, 12, prune_blocks=6) for i in range(12)] == [True] * 6 + [False] * 6
    # through merge_step: block L // 2 of a 12-block model drops its sources
    g = torch.Generator().manual_seed(0)
    x, k = torch.randn(1, 17, 6, generator=g), torch.randn(1, 2, 17, 4, generator=g)
    step = lambda layer, **o: methods.merge_step(  # noqa: E731
        x, None, None, k, method="tofu", r=4, protected=1, layer=layer, num_layers=12, options=o)
    pruned, merged = step(6), step(6, prune_blocks=6)
    assert pruned[1].sum() == 13 and merged[1].sum() == 17  # sizes: dropped tokens are gone
    with pytest.raises(ConfigError, match="prune_blocks"):
        tomec.backend(method="tofu", r=8, prune_blocks=-1)



@pytest.mark.parametrize("n,r,protected", [(17, 8, 1), (40, 12, 2)])
def test_norm_preserving_merge_equals_oracle(n, r, protected):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 6, dtype=torch.float64, generator=g)
    size = torch.randint(1, 4, (2, n, 1), generator=g).double()
    dest = ops.bipartite_match(torch.randn(2, n, 8, dtype=torch.float64, generator=g), r, protected)
    out, size_out = ops.merge(x, size, dest, n - r, mode="norm_preserving")
    ref, size_ref = tome_oracle.merge(x, size, dest, n - r, mode="norm_preserving")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(size_out, size_ref)
