"""DiffRate: the prune-then-merge against its oracle (fp64, ties), similarity-scaled sizes, the kept schedules
(errors, warnings, the official and shipped ones)."""

from __future__ import annotations

import json

import pytest
import torch

import tomec
from tests.helpers import tie_metric
from tests.oracles import diffrate as diffrate_oracle
from tomec import ops
from tomec.errors import ConfigError, ScheduleError


@pytest.mark.parametrize("n,protected", [(6, 1), (17, 1), (18, 2), (33, 5)])
@pytest.mark.parametrize("with_size", [False, True])
def test_diffrate_equals_oracle(n, protected, with_size):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 10, dtype=torch.float64, generator=g)
    q, k = (torch.randn(2, 3, n, 8, dtype=torch.float64, generator=g) for _ in range(2))
    size = torch.randint(1, 5, (2, n, 1), generator=g).double() if with_size else None
    t = n - protected
    for r, n_dropped in [(0, 0), (1, 0), (t // 2, 0), (t - 1, 0), (t // 2, 1), (t // 2, t // 2)]:
        got = ops.diffrate_match(x, q, k, size, r, protected, n_dropped=n_dropped)
        want = diffrate_oracle.diffrate_match(x, q, k, size, r, protected, n_dropped=n_dropped)
        assert torch.equal(got[0], want[0]), (r, n_dropped)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)
        assert (got[0] == -1).sum(1).eq(n_dropped).all()



def test_diffrate_ties_equal_oracle():
    # a zero CLS query attends uniformly: every importance ties; tokens with four ones of 16 have
    # exact cosines (multiples of 1/4), and repeat, so similarities tie too
    g = torch.Generator().manual_seed(0)
    n, protected = 21, 1
    x = tie_metric(2, 5, seed=0)[:, torch.randint(0, 5, (n,), generator=g)]
    q = torch.randn(2, 2, n, 4, dtype=torch.float64, generator=g)
    q[:, :, 0] = 0.0
    k = torch.randn(2, 2, n, 4, dtype=torch.float64, generator=g)
    for r, n_dropped in [(5, 0), (10, 3), (19, 0)]:
        got = ops.diffrate_match(x, q, k, None, r, protected, n_dropped=n_dropped)
        want = diffrate_oracle.diffrate_match(x, q, k, None, r, protected, n_dropped=n_dropped)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("cosine", [0.6, 0.2, -0.6])
def test_diffrate_merged_size_is_similarity_scaled(cosine):
    # The official evaluation path: merged size = size_dst + size_src * sim, never clamped at 1 (the
    # old clamp made it 2 for every sim <= 1); a negative similarity adds nothing (tomec's guard).
    x = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [cosine, (1 - cosine**2) ** 0.5, 0.0]]],
                     dtype=torch.float64)
    q = torch.zeros(1, 2, 3, 4, dtype=torch.float64)  # uniform importance (no size bias): 1 kept
    k = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    size = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=torch.float64)
    dest, w, src_size = ops.diffrate_match(x, q, k, size, 1, 1, prop_attn=False)
    assert dest.tolist() == [[0, 1, 1]]
    _, merged = ops.merge(x, src_size, dest, 2, w)
    want = 2.0 + 3.0 * max(cosine, 0.0)
    torch.testing.assert_close(merged[0, :, 0], torch.tensor([1.0, want], dtype=torch.float64))



def test_diffrate_needs_a_class_token():
    x, q = torch.randn(1, 9, 8), torch.randn(1, 2, 9, 4)
    with pytest.raises(ConfigError, match="needs protect >= 1"):
        ops.diffrate_match(x, q, q, None, 3, 0)



def test_diffrate_kept_schedule(tmp_path):
    kept = {"prune_kept": [101, 101, 90, 80, 80, 70], "merge_kept": [101, 95, 85, 80, 70, 60]}
    path = tmp_path / "kept.json"
    path.write_text(json.dumps(kept))
    config = tomec.TomecConfig(method="diffrate", method_options={"kept": str(path)})
    assert config.resolve_schedule(6, 101, 1) == [0, 6, 10, 5, 10, 10]
    plans = [config.method_spec.layer_merge(config.method_options, i, 6, r)
             for i, r in enumerate([0, 6, 10, 5, 10, 10])]
    assert [p.n_dropped for p in plans] == [0, 0, 5, 5, 0, 0]  # blocks 2 and 3 prune 95->90, 85->80
    with pytest.raises(ConfigError, match="drop r= / schedule="):
        tomec.backend(method="diffrate", r=10, kept=kept)
    with pytest.raises(ConfigError, match="does not exist"):
        tomec.backend(method="diffrate", kept=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="'prune_kept' and 'merge_kept'"):
        tomec.backend(method="diffrate", kept={"merge_kept": [1]})
    with pytest.raises(ScheduleError, match="6 entries but the model has 12"):
        config.resolve_schedule(12, 197, 1)



def test_diffrate_sizes_stay_positive_for_dissimilar_sources():
    """Sources opposite to every kept token (cosine -1) add nothing to their destination's size (the
    original would add a negative one), so the next block's log(size) stays finite (found on the
    digits model at 5 tokens)."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, -1.0], [0.0, -1.0]]])
    q = torch.zeros(1, 1, 5, 2)
    k = torch.zeros(1, 1, 5, 2)
    dest, _, size = ops.diffrate_match(x, q, k, None, 2, 1)
    assert size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # the two sources: cosine -1
    _, size_out = ops.merge(x, size, dest, 3, torch.ones_like(size))
    assert torch.isfinite(size_out.log()).all() and size_out[0, :, 0].tolist() == [1.0, 1.0, 1.0]



def _diffrate_schedule(kept, num_layers=6, num_tokens=101, protected=1):
    config = tomec.TomecConfig(method="diffrate", method_options={"kept": kept})
    return config.resolve_schedule(num_layers, num_tokens, protected)



@pytest.mark.parametrize("num_tokens", [101, 197])
def test_diffrate_kept_counts_above_the_model_are_errors(num_tokens):
    with pytest.raises(ScheduleError, match=rf"merge_kept\[0\]=200 is more than the {num_tokens} tokens"):
        _diffrate_schedule({"prune_kept": [101] * 6, "merge_kept": [200] * 6}, num_tokens=num_tokens)
    with pytest.raises(ScheduleError, match=rf"prune_kept\[3\]=250 is more than the {num_tokens} tokens"):
        _diffrate_schedule({"prune_kept": [90, 80, 70, 250, 50, 40], "merge_kept": [85, 75, 65, 55, 45, 35]},
                           num_tokens=num_tokens)



@pytest.mark.parametrize("protected", [1, 2])
def test_diffrate_kept_counts_must_keep_more_than_the_protected_tokens(protected):
    kept = {"prune_kept": [101, 90, 80, protected, 50, 40], "merge_kept": [95, 85, 75, 60, 45, 35]}
    with pytest.raises(ScheduleError, match=rf"prune_kept\[3\]={protected} keeps no more than the "
                                            rf"{protected} protected tokens; block 3 must keep at least"):
        _diffrate_schedule(kept, protected=protected)
    kept = {"prune_kept": [101, 90, 80, 70, 50, 40], "merge_kept": [95, 85, 75, 60, 45, protected]}
    with pytest.raises(ScheduleError, match=rf"merge_kept\[5\]={protected} keeps no more"):
        _diffrate_schedule(kept, protected=protected)
    # one patch token beside the protected ones is the least a block may keep
    kept = {"prune_kept": [101] + [protected + 1] * 5, "merge_kept": [60] + [protected + 1] * 5}
    assert _diffrate_schedule(kept, protected=protected) == [41, 59 - protected, 0, 0, 0, 0]



def test_diffrate_counts_above_the_tokens_present_warn_and_clamp_as_the_original():
    # block 2 asks to keep 95 of the 90 tokens that reach it: it prunes and merges nothing
    kept = {"prune_kept": [101, 90, 95, 80, 70, 60], "merge_kept": [101, 90, 95, 80, 70, 60]}
    with pytest.warns(UserWarning, match=r"block 2 prunes nothing \(prune_kept 95, 90 tokens enter\); "
                                         r"block 2 merges nothing \(merge_kept 95, 90 tokens after pruning\)"):
        assert _diffrate_schedule(kept) == [0, 11, 0, 10, 10, 10]
    # a merge count above its block's prune count: the block only prunes
    kept = {"prune_kept": [101, 90, 80, 70, 60, 50], "merge_kept": [95, 85, 85, 65, 55, 45]}
    with pytest.warns(UserWarning, match=r"block 2 merges nothing \(merge_kept 85, 80 tokens after pruning\)"):
        schedule = _diffrate_schedule(kept)
    assert schedule == [6, 10, 5, 15, 10, 10]
    config = tomec.TomecConfig(method="diffrate", method_options={"kept": kept})
    assert [config.method_spec.layer_merge(config.method_options, i, 6, r).n_dropped
            for i, r in enumerate(schedule)] == [0, 5, 5, 10, 5, 5]  # block 2 removes only its 5 pruned



# Published searched schedules of DiffRate's original (OpenGVLab/DiffRate, compression_rate.json):
# DeiT-S at 2.9 GFLOPs, whose counts never rise, and at 2.5, where blocks 6 and 7 prune to more
# tokens than reach them (the original clamps those, as tomec does).
_DIFFRATE_DEIT_S = {
    2.9: {"prune_kept": [197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3],
          "merge_kept": [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]},
    2.5: {"prune_kept": [197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3],
          "merge_kept": [197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3]},
}



def _official_tokens(kept, num_tokens):
    out, n = [], num_tokens  # the original's evaluation: x[:, :prune_kept], then merge to merge_kept
    for pk, mk in zip(kept["prune_kept"], kept["merge_kept"]):
        n = min(n, pk, mk)
        out.append(n)
    return out



def test_diffrate_official_and_shipped_schedules_still_pass():
    import warnings
    from pathlib import Path

    for flops, kept in _DIFFRATE_DEIT_S.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error" if flops == 2.9 else "ignore")
            schedule = _diffrate_schedule(kept, 12, 197, 1)
        left = [197 - sum(schedule[: i + 1]) for i in range(12)]
        assert left == _official_tokens(kept, 197), flops
    with pytest.warns(UserWarning, match=r"block 6 prunes nothing \(prune_kept 111, 107 tokens enter\); "
                                         r"block 7 prunes nothing \(prune_kept 99, 96 tokens enter\)$"):
        _diffrate_schedule(_DIFFRATE_DEIT_S[2.5], 12, 197, 1)

    # the schedules this repository ships (searched and geometric ones on the 6-block digits ViT)
    results = json.loads((Path(__file__).parents[2] / "bench/results/finetune-diffrate.json").read_text())
    shipped = []

    def collect(node):
        if isinstance(node, dict):
            if "prune_kept" in node:
                shipped.append(node)
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(results)
    assert len(shipped) >= 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kept in shipped:
            left = [65 - sum(_diffrate_schedule(kept, 6, 65, 1)[: i + 1]) for i in range(6)]
            assert left == _official_tokens(kept, 65)
