"""The shared A/B matching (tomec.ops.bipartite_match) against its loop oracle (fp64, exact, ties),
its map's structure, low precision equal to fp32."""

from __future__ import annotations


import pytest
import torch

from tests.helpers import tie_metric
from tests.oracles import tome as oracle
from tomec import ops


SHAPES = [(5, 0), (6, 1), (17, 1), (18, 2), (33, 5), (64, 1), (197, 1)]



def _rs(n: int, protected: int) -> list[int]:
    cap = (n - protected) // 2
    return sorted({0, 1, cap // 2, cap})



def _cases():
    for n, p in SHAPES:
        for r in _rs(n, p):
            yield n, p, r



@pytest.mark.parametrize("n,protected,r", list(_cases()))
def test_bipartite_match_equals_oracle(n, protected, r):
    g = torch.Generator().manual_seed(n * 100 + protected * 10 + r)
    metric = torch.randn(3, n, 12, dtype=torch.float64, generator=g)
    dest = ops.bipartite_match(metric, r, protected)
    assert dest.dtype == torch.int64 and dest.shape == (3, n)
    assert torch.equal(dest, oracle.bipartite_match(metric, r, protected))



@pytest.mark.parametrize("n,protected,r", [(9, 1, 4), (16, 0, 8), (33, 2, 10), (50, 1, 24)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bipartite_match_ties_equal_oracle(n, protected, r, seed):
    metric = tie_metric(2, n, seed)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    assert scores[0].unique().numel() < scores[0].numel()  # the input really ties
    assert torch.equal(ops.bipartite_match(metric, r, protected), oracle.bipartite_match(metric, r, protected))



def test_bipartite_match_all_tied():
    metric = torch.ones(2, 11, 4, dtype=torch.float64)  # every score is 1: pure tie-breaking
    for protected in (0, 1, 3):
        for r in range((11 - protected) // 2 + 1):
            assert torch.equal(
                ops.bipartite_match(metric, r, protected), oracle.bipartite_match(metric, r, protected)
            )



@pytest.mark.parametrize("n,protected,r", [(17, 1, 8), (18, 2, 5), (33, 5, 14)])
def test_destination_map_structure(n, protected, r):
    dest = ops.bipartite_match(torch.randn(4, n, 8), r, protected)
    n_out = n - r
    assert torch.equal(dest[:, :protected], torch.arange(protected).expand(4, protected))
    for b in range(4):
        assert sorted(set(dest[b].tolist())) == list(range(n_out))  # every slot used, none beyond
        b_side = [j for j in range(1, n, 2) if j >= protected]  # B tokens: the last slots, in order
        assert dest[b, b_side].tolist() == list(range(n_out - len(b_side), n_out))



def _low_precision_keys(shape, seed):
    """Keys that fp16 and bf16 hold exactly: multiples of 1/4 within [-4, 4], and a fifth of the
    tokens 3 x another one (a scaled copy ties with its original in exact arithmetic, but its norm
    rounds differently: such ties are decided by the rounding of the scores). With heads, head h
    is scaled by 2^(-6h): each head stays exact, their sum only in fp32 (so a head sum rounded to
    fp16/bf16 would split the ties differently). Also continuous values rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(shape, generator=g) * 4).round().clamp(-16, 16) / 4
    if len(shape) == 4:
        keys = keys * 2.0 ** (-6 * torch.arange(shape[1])).view(1, -1, 1, 1)
    n = shape[-2]
    order = 1 + torch.randperm(n - 1, generator=g)
    original, copy = order[: n // 5], order[n // 5 : 2 * (n // 5)]
    keys[..., copy, :] = 3 * keys[..., original, :]
    continuous = torch.randn(shape, generator=g).to(torch.bfloat16).to(torch.float16).float()
    return keys, continuous



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(4, 61, 16), (4, 3, 61, 16)], ids=["metric", "keys"])
def test_match_low_precision_equals_fp32(dtype, shape):
    """Scores are widened to fp32 before they decide (keys summed over heads in fp32): on values that
    fp16 and bf16 hold exactly, the low-precision map EQUALS the fp32 map of the same values, for
    every r, ties included. Maps computed from fp16/bf16 scores, or from a head sum rounded to
    fp16/bf16, differ on these inputs (checked by making the op do so)."""
    for family, keys in enumerate(_low_precision_keys(shape, seed=7)):
        for r in (1, 10, 30):
            for drop in (False, True):
                want = ops.bipartite_match(keys, r, 1, drop_sources=drop)
                got = ops.bipartite_match(keys.to(dtype), r, 1, drop_sources=drop)
                assert torch.equal(got, want), (family, r, drop, int((got != want).sum()))
