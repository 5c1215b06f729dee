"""PiToMe: the matching against its oracle (fp64, ties), the per-block variants and margins, the
keep-ratio schedule."""

from __future__ import annotations


import pytest
import torch

import tomec
from tests.helpers import compile_tomec, images, make_model, tie_metric
from tests.oracles import pitome as pitome_oracle
from tomec import methods, ops


SHAPES = [(5, 0), (6, 1), (17, 1), (18, 2), (33, 5), (64, 1)]



def rs(n, protected):
    cap = (n - protected) // 2
    return sorted({0, 1, cap // 2, cap})



@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("n,protected", SHAPES)
def test_pitome_equals_oracle(n, protected, bsm):
    metric = torch.randn(2, n, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    for r in rs(n, protected):
        for margin in (0.75, 0.3):
            dest = ops.pitome_match(metric, r, protected, margin=margin, bsm=bsm)
            assert torch.equal(dest, pitome_oracle.pitome_match(metric, r, protected, margin, bsm)), (r, margin)



@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("n,protected", [(17, 1), (32, 0), (41, 3)])
def test_pitome_ties_equal_oracle(n, protected, bsm):
    # 0/1 tokens with four ones: every cosine is a multiple of 1/4, and with margin 0 the ELU stays
    # linear, so energies and scores are exact and tie everywhere
    metric = tie_metric(2, n, seed=n)
    for r in rs(n, protected):
        dest = ops.pitome_match(metric, r, protected, margin=0.0, bsm=bsm)
        assert torch.equal(dest, pitome_oracle.pitome_match(metric, r, protected, 0.0, bsm))



def test_pitome_schedule_of_variants_and_margins():
    assert [methods.pitome_uses_bsm(i, 12) for i in range(12)] == [True] * 6 + [False] * 6
    assert [methods.pitome_uses_bsm(i, 7) for i in range(7)] == [True] * 4 + [False] * 3
    assert [methods.pitome_uses_bsm(i, 12, bsm_first=False) for i in range(12)] == [False] * 6 + [True] * 6
    assert methods.pitome_margin(0, 12) == 0.75 and methods.pitome_margin(6, 12) == 0.375



def test_keep_ratio_schedule_with_pitome():
    model = make_model("deit_tiny_patch16_224")
    compiled, be = compile_tomec(model, method="pitome", schedule=tomec.schedule.keep_ratio(0.9),
                                 compiler="eager", prop_attn=False)
    with torch.no_grad():
        compiled(images("deit_tiny_patch16_224", 1))
    assert be.schedule == [19, 17, 16, 14, 13, 11, 10, 9, 8, 7, 7, 6]  # PiToMe's own numbers
