"""PiToMe, ToFu, DCT and DiffRate: ops against their oracles (fp64), properties, model parity."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import tomec
from tests.helpers import TOLERANCE, check_parity, compile_tomec, images, make_model, relative_error, tie_metric
from tests.oracles import dct as dct_oracle
from tests.oracles import diffrate as diffrate_oracle
from tests.oracles import pitome as pitome_oracle
from tests.oracles import tome as tome_oracle
from tomec import methods, ops
from tomec.errors import ConfigError, ScheduleError

SHAPES = [(5, 0), (6, 1), (17, 1), (18, 2), (33, 5), (64, 1)]
METHODS = ["tome", "tofu", "pitome", "dct", "diffrate"]


def rs(n, protected):
    cap = (n - protected) // 2
    return sorted({0, 1, cap // 2, cap})


# --- PiToMe ---------------------------------------------------------------------------------------


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


# --- ToFu -----------------------------------------------------------------------------------------


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


# --- DCT ------------------------------------------------------------------------------------------


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


# --- DiffRate -------------------------------------------------------------------------------------


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
    plans = [config.method_spec.layer_merge(i, 6, r, config.method_options)
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


# --- every method ---------------------------------------------------------------------------------


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(ConfigError, match="method 'pitome' has no option 'margn'; its options are: bsm_first, margin"):
        tomec.backend(method="pitome", r=10, margn=0.3)
    with pytest.raises(ConfigError, match="bsm_first must be True or False"):
        tomec.backend(method="pitome", r=10, bsm_first="yes")
    with pytest.raises(ConfigError, match="does not support source tracking"):
        tomec.backend(method="dct", r=10, trace_source=True)


@pytest.mark.parametrize("method", [m for m in methods.available() if methods.get(m).site == "attention"])
def test_properties_of_the_merge_step(method):
    """Three chained block steps (one for FPET, whose grid must be square): sizes sum to the patches
    kept, protected tokens stay first and unchanged, sources agree."""
    spec = methods.get(method)
    options = spec.check_options({})
    g = torch.Generator().manual_seed(3)
    n, protected, heads = 38, 2, 4  # 36 patches: a 6 x 6 grid
    x = torch.randn(3, n, 16, generator=g)
    keys, queries = (torch.randn(3, heads, n, 8, generator=g) for _ in range(2))
    size, source, total = None, None, n
    prefix = x[:, :protected].clone()
    for layer, r in enumerate([10] if method == "fpet" else [10, 8, 5]):
        plan = spec.layer_merge(layer, 6, r, options)
        params = None
        if spec.params is not None:  # learned tensors (DTEM's heads), as the passes give them
            params = spec.params(options, layer=layer, num_layers=6, channels=16, head_dim=8)
        x, size, source = methods.merge_step(
            x, size, source, keys[:, :, : x.shape[1]], queries[:, :, : x.shape[1]], method=method,
            r=r, protected=protected, layer=layer, num_layers=6, trace_source=True,
            options=options, attn_in=x, params=params,
        )
        total -= plan.n_dropped
        assert x.shape[1] == size.shape[1]
        torch.testing.assert_close(x[:, :protected], prefix)  # protected: first and unchanged
        assert torch.equal(source[:, :protected], torch.arange(protected).expand(3, protected))
        for b in range(3):  # a source entry per original token kept; counts agree with sizes
            counts = torch.bincount(source[b][source[b] >= 0], minlength=x.shape[1]).float()
            assert (counts >= 1).all() and counts.sum() == total
            if method != "diffrate":  # DiffRate's sizes are similarity-weighted, not counts
                assert torch.equal(counts, size[b, :, 0])


@pytest.mark.parametrize(
    "method,name,fused,batch",
    [
        (m, name, fused, batch)
        for m in ["tofu", "pitome", "dct", "diffrate"]
        for name, fused, batch in itertools.product(["test_vit", "deit_tiny_patch16_224"], [True, False], [1, 4])
    ],
)
def test_model_parity_eager_compiler(method, name, fused, batch):
    check_parity(name, fused, batch, method=method, trace_source=methods.get(method).supports_source)


@pytest.mark.parametrize("method", methods.available())
def test_r0_equals_unmerged(method):
    model = make_model("test_vit")
    x = images("test_vit", 2)
    compiled, be = compile_tomec(model, method=method, r=0, compiler="eager")
    with torch.no_grad():
        out, plain = compiled(x), model(x)
    if methods.get(method).reorders_at_r0:  # LTMP still permutes its tokens: the same up to rounding
        assert relative_error(out, plain) <= TOLERANCE and not torch.equal(out, plain)
    else:
        assert torch.equal(out, plain)
    assert be.schedule == [0] * 6


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in methods.available() if m not in ("tome", "ltmp")])
def test_model_parity_inductor(method):
    """Every method's ops under Inductor (ToMe: test_backend; LTMP with its counts: test_ltmp)."""
    check_parity("test_vit", True, 4, method=method, compiler="inductor", depth=3)


def test_keep_ratio_schedule_with_pitome():
    model = make_model("deit_tiny_patch16_224")
    compiled, be = compile_tomec(model, method="pitome", schedule=tomec.schedule.keep_ratio(0.9),
                                 compiler="eager", prop_attn=False)
    with torch.no_grad():
        compiled(images("deit_tiny_patch16_224", 1))
    assert be.schedule == [19, 17, 16, 14, 13, 11, 10, 9, 8, 7, 7, 6]  # PiToMe's own numbers


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
    assert [config.method_spec.layer_merge(i, 6, r, config.method_options).n_dropped
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
    results = json.loads((Path(__file__).parents[1] / "bench/results/finetune-diffrate.json").read_text())
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
