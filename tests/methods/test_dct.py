"""DCT: the truncation against its oracle, its properties."""

from __future__ import annotations


import pytest
import torch

from tests.oracles import dct as dct_oracle
from tomec import ops


SHAPES = [(5, 0), (6, 1), (17, 1), (18, 2), (33, 5), (64, 1)]



@pytest.mark.parametrize("n,n_out,protected", [(5, 3, 0), (17, 9, 1), (20, 20, 2), (33, 2, 1), (64, 40, 5)])
def test_dct_equals_oracle(n, n_out, protected):
    x = torch.randn(2, n, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    out = ops.dct_truncate(x, n_out, protected)
    torch.testing.assert_close(out, dct_oracle.dct_truncate(x, n_out, protected), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, :protected], x[:, :protected])



def test_dct_properties():
    x = torch.randn(2, 30, 5, dtype=torch.float64)
    torch.testing.assert_close(ops.dct_truncate(x, 30, 1), x)  # nothing removed: the identity
    const = torch.ones(2, 30, 5, dtype=torch.float64)  # a constant signal keeps its energy
    low = ops.dct_truncate(const, 11, 1)[:, 1:]
    torch.testing.assert_close((low**2).sum(1), (const[:, 1:] ** 2).sum(1))
    half = ops.dct_truncate(x.half(), 20, 1)
    assert half.dtype == torch.float16  # computed in fp32, returned in the input dtype
    torch.testing.assert_close(half.double(), ops.dct_truncate(x, 20, 1), atol=2e-2, rtol=2e-2)
