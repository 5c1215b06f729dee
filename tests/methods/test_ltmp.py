"""LTMP: the op against its oracle (fp64), properties, thresholds, model parity (calibration and
learning the thresholds: tests/train/test_ltmp.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import tomec
from tests.helpers import TOLERANCE, images, make_model, relative_error, tie_metric
from tests.oracles import ltmp as oracle
from tomec import ops, reference
from tomec.errors import ConfigError, ScheduleError
from tomec.ops import attention_received
from tomec.methods.ltmp import ltmp_match, ltmp_prune_cap, ltmp_threshold_counts
from tomec.train import vit

SHAPES = [(5, 0), (6, 0), (6, 1), (9, 1), (10, 2), (11, 3), (12, 3), (17, 1)]


def _inputs(n, seed, batch=2, heads=2, d=4):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, heads, n, d, dtype=torch.float64, generator=g)
    q = torch.randn(batch, heads, n, d, dtype=torch.float64, generator=g)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).double()
    return k, q, size


def _counts(n, protected):
    for m in sorted({0, 1, (n - protected) // 4, (n - protected) // 2}):
        if m > (n - protected) // 2:
            continue
        cap = ltmp_prune_cap(n, protected, m)
        for p in sorted({0, 1, cap // 2, cap}):
            if p <= cap:
                yield m, p


# --- the op ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,protected", SHAPES)
def test_equals_oracle(n, protected):
    k, q, size = _inputs(n, seed=n + 7 * protected)
    imp = oracle.importance(q, k, size)
    assert torch.allclose(attention_received(q, k, size), torch.tensor(imp, dtype=torch.float64),
                          rtol=1e-12, atol=1e-12)
    for m, p in _counts(n, protected):
        got = ltmp_match(k, q, size, m, p, protected)
        assert torch.equal(got, oracle.ltmp_match(k, q, size, m, p, protected, imp=imp)), (m, p)


@pytest.mark.parametrize("n,protected", [(17, 1), (20, 0), (21, 3)])
def test_ties_equal_oracle(n, protected):
    # exact cosine ties (0/1 keys) and importance with many exact ties
    keys = tie_metric(2, n, seed=n)
    imp = torch.randint(0, 3, (2, n), generator=torch.Generator().manual_seed(n)).double()
    for m, p in _counts(n, protected):
        got = ltmp_match(keys, None, None, m, p, protected, importance=imp)
        want = oracle.ltmp_match(keys, None, None, m, p, protected, imp=imp.tolist())
        assert torch.equal(got, want), (m, p)


@pytest.mark.parametrize("n,protected", SHAPES)
def test_properties(n, protected):
    k, q, size = _inputs(n, seed=3 * n + protected)
    x = torch.randn(2, n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3 * n + protected + 1))
    for m, p in _counts(n, protected):
        dest = ltmp_match(k, q, size, m, p, protected)
        n_out = n - m - p
        assert ((dest == -1).sum(-1) == p).all()
        assert torch.equal(dest[:, :protected], torch.arange(protected).expand(2, protected))
        for b in range(2):  # every output slot has a member
            assert set(dest[b][dest[b] >= 0].tolist()) == set(range(n_out))
        if p == 0 and m > 0:
            assert torch.equal(dest, ops.bipartite_match(k, m, protected))
        out, out_size = ops.merge(x, None, dest, n_out, n_dropped=p)
        assert out.shape == (2, n_out, 5) and torch.equal(out_size.sum((1, 2)), torch.full((2,), n - p).double())
        assert torch.equal(out[:, :protected], x[:, :protected])
    idle = ltmp_match(k, q, size, 0, 0, protected)  # nothing removed: still A then B
    assert torch.equal(idle, oracle.ltmp_match(k, q, size, 0, 0, protected))
    assert torch.equal(idle, ops.bipartite_match(k, 0, protected))  # ToMe's order at r = 0
    assert n <= protected + 2 or not torch.equal(idle, torch.arange(n).expand(2, n))


def test_merged_tokens_are_not_pruned_in_the_same_block():
    k, q, size = _inputs(16, seed=5)
    dest = ltmp_match(k, q, size, 4, 7, 1)
    merged = ops.bipartite_match(k, 4, 1)
    for b in range(2):
        shared = {s for s in merged[b].tolist() if (merged[b] == s).sum() > 1}
        assert all(dest[b, i] >= 0 for i in range(16) if int(merged[b, i]) in shared)


def test_counts_out_of_range_are_errors():
    k, q, size = _inputs(10, seed=0)
    with pytest.raises(ConfigError, match=r"n_merge=5 is outside \[0, 4\]"):
        ltmp_match(k, q, size, 5, 0, 1)
    with pytest.raises(ConfigError, match=r"n_prune=2 is outside \[0, 1\]"):
        ltmp_match(k, q, size, 4, 2, 1)
    with pytest.raises(ConfigError, match="needs the queries"):
        ltmp_match(k, None, size, 1, 1, 1)


# --- the thresholds -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,protected", SHAPES)
def test_threshold_counts_equal_oracle(n, protected):
    k, q, size = _inputs(n, seed=11 * n + protected)
    imp = attention_received(q, k, size)
    mid = imp[:, protected:].median().item() * (1 + 1e-9)  # not at a data value: no rounding ties
    for tm, tp in [(0.0, mid), (0.3, 2 * mid), (-0.3, 0.5 * mid), (0.9, 1.0)]:
        m, p = ltmp_threshold_counts(k, q, size, protected, tm, tp)
        want = oracle.threshold_counts(k, q, size, protected, tm, tp)
        assert list(zip(m.tolist(), p.tolist())) == want, (tm, tp)


def test_threshold_counts_by_construction():
    # Tokens 1..12 after a CLS: pairs (2i, 2i+1) share a key for i in {1, 3, 5}; all others are
    # orthogonal. Best scores: 1 for the three paired A tokens, 0 else. q = 0: uniform attention,
    # every importance is 1/N.
    n, d = 13, 16
    keys = torch.zeros(1, 1, n, d, dtype=torch.float64)
    for i in range(n):
        keys[0, 0, i, i] = 1.0
    for a in (2, 6, 10):
        keys[0, 0, a] = keys[0, 0, a + 1]
    q = torch.zeros_like(keys)
    m, p = ltmp_threshold_counts(keys, q, None, 1, 0.5, 1 / n - 1e-9)
    assert (m.item(), p.item()) == (3, 0)
    m, p = ltmp_threshold_counts(keys, q, None, 1, 0.5, 1 / n + 1e-9)
    assert (m.item(), p.item()) == (3, 12 - 6)  # every untouched token; none of the merged six
    m, p = ltmp_threshold_counts(keys, q, None, 1, 1.5, 1 / n + 1e-9)
    assert (m.item(), p.item()) == (0, 12)  # no merge: every patch may go, the CLS stays
    m, p = ltmp_threshold_counts(keys, q, None, 1, -1.5, -1.0)
    assert (m.item(), p.item()) == (6, 0)  # ToMe's cap (12 // 2), nothing below -1


# --- the method -----------------------------------------------------------------------------------


COUNTS = {"merge": [6, 4, 3, 2, 2, 1], "prune": [4, 3, 2, 2, 1, 1]}


def test_options_and_errors(tmp_path):
    with pytest.raises(ConfigError, match="tomec calibrate"):
        tomec.backend(method="ltmp", thresholds={"merge": [0.9], "prune": [0.0]})
    with pytest.raises(ConfigError, match="drop r="):
        tomec.backend(method="ltmp", r=8, counts=COUNTS)
    with pytest.raises(ConfigError, match="give counts= only"):
        tomec.backend(method="ltmp", counts=COUNTS, thresholds={"merge": [0.9] * 6, "prune": [0.0] * 6})
    with pytest.warns(UserWarning, match="nothing is pruned"):
        tomec.backend(method="ltmp", r=8)
    with pytest.raises(ConfigError, match="non-negative ints"):
        tomec.backend(method="ltmp", counts={"merge": [1, -1], "prune": [0, 0]})
    with pytest.raises(ConfigError, match="2 merge entries and 1 prune"):
        tomec.backend(method="ltmp", counts={"merge": [1, 1], "prune": [0]})
    with pytest.raises(ConfigError, match="does not exist"):
        tomec.backend(method="ltmp", counts=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="must map 'merge' and 'prune'"):
        tomec.backend(method="ltmp", counts=[1, 2])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**COUNTS, "images": 3}))
    assert tomec.backend(method="ltmp", counts=str(path)).config.method_options.counts == COUNTS
    spec = tomec.methods.get("ltmp")
    opts = spec.make_options({"counts": COUNTS})
    assert spec.schedule(opts, 6, 65, 1) == [10, 7, 5, 4, 3, 2]
    with pytest.raises(ScheduleError, match="6 entries but the model has 4"):
        spec.schedule(opts, 4, 65, 1)
    bad = spec.make_options({"counts": {"merge": [20, 0], "prune": [0, 0]}})
    with pytest.raises(ScheduleError, match="block 0 merges 20 of 33 tokens .* at most 16"):
        spec.schedule(bad, 2, 33, 1)
    bad = spec.make_options({"counts": {"merge": [10, 0], "prune": [13, 0]}})
    with pytest.raises(ScheduleError, match="block 0 prunes 13 of 33 tokens after merging 10 .* at most 12"):
        spec.schedule(bad, 2, 33, 1)


@pytest.mark.parametrize("fused,batch,prop_attn", [(True, 1, True), (False, 2, True), (True, 2, False)])
def test_compiled_equals_reference(fused, batch, prop_attn):
    model = make_model("test_vit", fused, depth=3)
    c = {"merge": [6, 4, 3], "prune": [4, 3, 2]}
    x = images("test_vit", batch)
    torch._dynamo.reset()
    be = tomec.backend(method="ltmp", counts=c, prop_attn=prop_attn, compiler="eager",
                       trace_source=True)
    compiled = torch.compile(model, backend=be, fullgraph=True)
    ref = reference.patch(copy.deepcopy(model), "ltmp", counts=c, prop_attn=prop_attn,
                          trace_source=True)
    with torch.no_grad():
        out, expect, plain = compiled(x), ref(x), model(x)
    st = reference.state(ref)
    assert be.schedule == st.schedule == [10, 7, 5]
    assert be.tokens_per_block == st.tokens_per_block
    assert relative_error(out, expect) <= TOLERANCE
    assert relative_error(out, plain) > 1e-2
    assert torch.equal(be.last_info["source"], st.source)
    # pruned tokens drop out with every patch they hold (a token merged in an earlier block may go)
    assert ((st.source == -1).sum(-1) >= sum(c["prune"])).all()


def _official_forward(model, x, counts, prop_attn, reorder_idle=True):
    """Blocks by hand with the oracle's dest maps: every block rebuilds its tokens A then B, also
    one that removes nothing (the official inference code), so later splits see that order."""
    tokens, size = vit.embed(model, x), None
    for layer, block in enumerate(model.blocks):
        out, q, k, _ = vit.attention(block.attn, block.norm1(tokens), size if prop_attn else None, explicit=True)
        tokens = tokens + block.ls1(out)
        m, p = counts["merge"][layer], counts["prune"][layer]
        if m + p == 0 and not reorder_idle:  # tomec's rule before: such a block left alone
            tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
            continue
        dest = oracle.ltmp_match(k, q, size, m, p, 1, scale=block.attn.scale, prop_attn=prop_attn)
        tokens, size = ops.merge(tokens, size, dest, tokens.shape[1] - m - p, n_dropped=p)
        tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
    return model.forward_head(model.norm(tokens))


@pytest.mark.parametrize("prop_attn", [True, False])
def test_block_removing_nothing_still_reorders(prop_attn):
    # block 0 removes nothing, block 1 merges and prunes: its A/B split is over block 0's A-then-B
    # order, not the patch order (the old code left block 0 alone: a different answer)
    model = make_model("test_vit", True, depth=3).double()
    c = {"merge": [0, 6, 0], "prune": [0, 3, 0]}
    x = images("test_vit", 2).double()
    torch._dynamo.reset()
    be = tomec.backend(method="ltmp", counts=c, prop_attn=prop_attn, compiler="eager")
    compiled = torch.compile(model, backend=be, fullgraph=True)
    ref = reference.patch(copy.deepcopy(model), "ltmp", counts=c, prop_attn=prop_attn)
    with torch.no_grad():
        want = _official_forward(model, x, c, prop_attn)
        got_ref, got = ref(x), compiled(x)
        skipped = _official_forward(model, x, c, prop_attn, reorder_idle=False)
    assert relative_error(got_ref, want) <= 1e-10 and relative_error(got, want) <= 1e-10
    assert relative_error(skipped, want) > 1e-4  # the case separates the two rules
    assert "block 0 (blocks.0): 101 tokens, reordered A then B (r=0)" in be.report()


@pytest.mark.slow
def test_inductor_equals_reference():
    model = make_model("test_vit", True, depth=4)
    counts = {"merge": [0, 6, 4, 3], "prune": [0, 4, 3, 2]}  # block 0 only reorders
    x = images("test_vit", 2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=tomec.backend(method="ltmp", counts=counts), fullgraph=True)
    ref = reference.patch(copy.deepcopy(model), "ltmp", counts=counts)
    with torch.no_grad():
        assert relative_error(compiled(x), ref(x)) <= TOLERANCE
