"""PiToMe's matching kernel (kernels/pitome.py). Triton kernels against the plain-PyTorch ops, under TRITON_INTERPRET=1 (their own process).

``make test`` runs this folder separately with the variable set before Triton is imported. Outputs are
poisoned before each launch and checked as fully written. Matching inputs are small integers or 0/1
keys: the maps must be equal."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need TRITON_INTERPRET=1 (run by `make test`)", allow_module_level=True)

from tomec.kernels.pitome import PitomePlan, launch_pitome_match, plan_pitome, run_pitome_match  # noqa: E402
from tests.kernels.inputs import binary_keys, match_rs  # noqa: E402
from tomec import ops  # noqa: E402


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



PITOME_PLANS = [
    PitomePlan(False, 16, 16, 16, 16, 16, 16), PitomePlan(False, 16, 32, 64, 16, 32, 32),
    PitomePlan(True, 16), PitomePlan(True, 32),
]



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



def test_pitome_kernel_agrees_across_launch_configurations():
    """Every PiToMe plan gives the same map on random float keys (see test_match.py for why another
    plan, not a second launch, is what can fail under the interpreter)."""
    keys = torch.randn(2, 4, 70, 32, generator=torch.Generator().manual_seed(2))
    maps = []
    for plan in PITOME_PLANS + [plan_pitome(2, 70, 1, 17, True)]:
        dest = torch.full((2, 70), -7, dtype=torch.int64)
        run_pitome_match(keys, 17, 1, 0.5, True, dest, plan)
        maps.append(dest)
    assert all(torch.equal(m, maps[0]) for m in maps)



def test_pitome_plans_spread_small_batches():
    assert not plan_pitome(1, 577, 1, 72, True).per_image and plan_pitome(64, 577, 1, 72, True).per_image
