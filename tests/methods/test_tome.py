"""ToMe: its block step (the shared bipartite matching on the keys, a size-weighted merge) against the
loop oracle, fp64, over depth with sizes threaded; the matching itself: tests/ops/test_bipartite.py."""

from __future__ import annotations

import pytest
import torch

from tests.oracles import tome as oracle
from tomec import methods


@pytest.mark.parametrize("n,protected,schedule", [(17, 1, [8, 4]), (64, 1, [20, 10, 5]), (33, 5, [3, 0, 12])])
def test_block_steps_equal_the_oracle(n, protected, schedule):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 6, dtype=torch.float64, generator=g)
    size = source = None
    x_ref, size_ref, source_ref = x, torch.ones(2, n, 1, dtype=torch.float64), torch.arange(n).expand(2, n)
    for layer, r in enumerate(schedule):
        keys = torch.randn(2, 3, x.shape[1], 4, dtype=torch.float64, generator=g)
        x, size, source = methods.merge_step(
            x, size, source, keys, method="tome", r=r, protected=protected, layer=layer,
            num_layers=len(schedule), trace_source=True, options=methods.TomeOptions(),
        )
        dest = oracle.bipartite_match(keys.mean(1), r, protected)  # ToMe's head mean of the keys
        x_ref, size_ref = oracle.merge(x_ref, size_ref, dest, x_ref.shape[1] - r)
        source_ref = oracle.compose_source(source_ref, dest)
        torch.testing.assert_close(x, x_ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(size, size_ref) and torch.equal(source, source_ref)
