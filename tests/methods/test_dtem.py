"""DTEM: the learned head's matching, the soft merging op that trains it, weights through the pipeline
(the training itself: tests/train/test_dtem.py)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tomec
from tomec import ops, reference
from tomec.errors import ConfigError
from tomec.methods.dtem import dtem_match, load_heads, relaxed_topk, soft_merge
from tomec.train.dtem import DtemHeads
from tests.helpers import TOLERANCE, compile_error, compile_tomec, images, make_model, relative_error
from tests.oracles import dtem as oracle


def _case(batch, n, c, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=g, dtype=torch.float64)
    size = torch.rand(batch, n, 1, generator=g, dtype=torch.float64) * 2 + 0.5
    metric = torch.randn(batch, n, d, generator=g, dtype=torch.float64)
    return x, size, metric


@pytest.mark.parametrize("n,active,protected,r,k2", [
    (9, 9, 1, 2, 3), (10, 10, 0, 4, 2), (12, 9, 1, 3, 3), (11, 11, 2, 4, 1), (8, 8, 1, 0, 3), (7, 7, 1, 3, 5),
])
@pytest.mark.parametrize("tau", [(0.1, 0.1), (1.0, 0.5)])
@pytest.mark.parametrize("split", ["parity", "random"])
def test_soft_merge_matches_loop_oracle(n, active, protected, r, k2, tau, split):
    x, size, metric = _case(2, n, 5, 4, seed=n * 7 + r)
    order = None
    if split == "random":
        order = torch.rand(2, active - protected, generator=torch.Generator().manual_seed(r)).argsort(-1)
    got = soft_merge(x, size, metric, r, active, protected, k2=k2, tau1=tau[0], tau2=tau[1], order=order)
    want = oracle.soft_merge(x, size, metric, r, active, protected, k2, tau[0], tau[1], order)
    assert got[2] == want[2] == active - min(r, (active - protected) // 2)
    assert got[0].shape == x.shape and got[1].shape == size.shape  # the sequence keeps its length
    if split == "parity":  # exact positions
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
    else:
        # The merged tokens come sorted by size. Fully merged A tokens keep a size of 0 up to
        # rounding (1 - a row sum that is 1 in exact arithmetic), so their order among themselves
        # is rounding noise: they are compared in a canonical order, the sort checked on its own.
        live = got[1][:, protected:active, 0]
        assert r == 0 or (live[:, :-1] >= live[:, 1:] - 1e-12).all()  # r = 0 returns the input

        def canonical(out):
            xs, ss = out[0].clone(), out[1].clone()
            seg = slice(protected, active)
            for b in range(xs.shape[0]):
                keys = sorted(range(active - protected),
                              key=lambda i: (-round(float(ss[b, seg][i, 0]), 9), xs[b, seg][i].tolist()))
                xs[b, seg], ss[b, seg] = xs[b, seg][keys], ss[b, seg][keys]
            return xs, ss

        (gx, gs), (wx, ws) = canonical(got), canonical(want)
        torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gs, ws, rtol=1e-10, atol=1e-10)
    # size is conserved and the protected prefix and the inactive tail are untouched
    torch.testing.assert_close(got[1].sum(1), size.sum(1), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0][:, :protected], x[:, :protected])
    assert torch.equal(got[0][:, active:], x[:, active:])


def test_soft_merge_rejects_an_order_that_is_no_permutation():
    x, size, metric = _case(1, 7, 3, 2, seed=2)
    with pytest.raises(ValueError, match="permutation"):
        soft_merge(x, size, metric, 2, 7, 1, order=torch.tensor([[0, 1, 2, 3, 4, 4]]))
    with pytest.raises(ValueError, match="permutation"):
        soft_merge(x, size, metric, 2, 7, 1, order=torch.arange(5)[None])


def test_relaxed_topk_mass_and_rows():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 6, 5, generator=g, dtype=torch.float64)
    assign = relaxed_topk(scores, 4, k2=2, tau1=0.1, tau2=0.1)
    assert (assign >= 0).all() and (assign.sum(-1) <= 1 + 1e-12).all()
    assert ((assign > 0).sum(-1) <= 2).all()  # k2 candidates per A row
    # r rounds hand out mass r; rows over 1 are scaled down, so at most r remains
    assert (assign.sum((1, 2)) <= 4 + 1e-9).all() and (assign.sum((1, 2)) >= 1).all()
    want = torch.tensor([oracle.relaxed_topk(s.tolist(), 4, 2, 0.1, 0.1) for s in scores], dtype=torch.float64)
    torch.testing.assert_close(assign, want, rtol=1e-10, atol=1e-10)


def test_soft_merge_gradcheck():
    x, size, metric = _case(1, 7, 3, 2, seed=11)
    for t in (x, size, metric):
        t.requires_grad_(True)

    def fn(x, size, metric):
        out, s, _ = soft_merge(x, size, metric, 2, 7, 1, k2=2, tau1=1.0, tau2=1.0)
        return out, s

    assert torch.autograd.gradcheck(fn, (x, size, metric), eps=1e-6, atol=1e-6)


def test_dtem_match_is_tome_on_the_head_embedding():
    g = torch.Generator().manual_seed(0)
    attn_in = torch.randn(2, 17, 8, generator=g)
    w, b = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    got = dtem_match(attn_in, w, b, 5, 1)
    assert torch.equal(got, ops.bipartite_match(F.linear(attn_in, w, b), 5, 1))
    with pytest.raises(ConfigError, match="channels"):
        dtem_match(attn_in, torch.randn(4, 7), b, 5, 1)


# --- weights through the pipeline -----------------------------------------------------------


def _heads(seed=5):
    return DtemHeads.create(6, 64, 16, seed=seed)  # test_vit: 6 blocks of width 64, head width 16


def _logits(model, x, **kwargs):
    compiled, be = compile_tomec(model, method="dtem", r=40, compiler="eager", **kwargs)
    with torch.no_grad():
        return compiled(x), be


def _block_weights(**options):
    """Every block's resolved head tensors for test_vit (6 blocks, C = 64, head width 32), no model run."""
    spec = tomec.methods.get("dtem")
    opts = tomec.backend(method="dtem", r=8, **options).config.method_options
    return [spec.params(opts, layer=i, num_layers=6, channels=64, head_dim=32) for i in range(6)]


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_heads_from_every_form_agree(tmp_path):
    heads = _heads()
    path = heads.save(tmp_path / "heads.pt")
    forms = [heads, heads.state_dict(), path, str(path), load_heads(heads),
             nn.ModuleList(list(heads))]
    expect = _block_weights(heads=heads)
    assert all(_same(_block_weights(heads=form), expect) for form in forms[1:])
    model, x = make_model("test_vit"), images("test_vit", 2)
    out, _ = _logits(model, x, heads=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        random_out, _ = _logits(model, x)
    assert relative_error(random_out, out) > 100 * TOLERANCE  # the heads matter


def test_bad_heads_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        tomec.backend(method="dtem", r=8, heads=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="found key"):
        tomec.backend(method="dtem", r=8, heads={"blocks.0.weight": torch.zeros(2, 2)})
    with pytest.raises(ConfigError, match="nn.Linear"):
        tomec.backend(method="dtem", r=8, heads=nn.ModuleList([nn.ReLU()]))
    with pytest.raises(ConfigError, match="seed"):
        tomec.backend(method="dtem", r=8, seed=-1)
    model, x = make_model("test_vit"), images("test_vit", 1)
    err = compile_error(model, x, method="dtem", r=40, compiler="eager",
                        heads=DtemHeads.create(3, 64, 16))
    assert isinstance(err, ConfigError) and "heads has 3 blocks, the model 6 attention blocks" in str(err)


def test_warns_without_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="tomec"):
        with pytest.warns(UserWarning, match="DTEM is ToMe with a random metric"):
            tomec.backend(method="dtem", r=8)
    assert any("random metric" in rec.getMessage() for rec in caplog.records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tomec.backend(method="dtem", r=8, heads=_heads())  # no warning with weights


def test_random_heads_are_seeded_and_reproducible():
    model = make_model("test_vit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b, c = _block_weights(), _block_weights(), _block_weights(seed=1)
    default = _block_weights(heads=DtemHeads.for_model(model, seed=0))
    assert _same(a, b) and _same(a, default)  # the untrained init is DtemHeads' init
    assert not _same(a, c)


@pytest.mark.parametrize("fused,batch", [(True, 1), (False, 2)])
def test_parity_compiled_vs_reference_same_heads(fused, batch):
    model, x = make_model("test_vit", fused), images("test_vit", batch)
    heads = _heads()
    torch._dynamo.reset()
    be = tomec.backend(method="dtem", r=40, compiler="eager", heads=heads, trace_source=True)
    graphs = []

    def capture(gm, example_inputs):
        compiled = be(gm, example_inputs)
        graphs.append(gm)  # the passes rewrite Dynamo's graph module in place
        return compiled

    with torch.no_grad():
        out = torch.compile(model, backend=capture, fullgraph=True)(x)
    ref = reference.patch(make_model("test_vit", fused), "dtem", r=40, heads=heads, trace_source=True)
    with torch.no_grad():
        expect, plain = ref(x), model(x)
    st = reference.state(ref)
    assert be.schedule == st.schedule and be.tokens_per_block == st.tokens_per_block
    assert relative_error(out, expect) <= TOLERANCE
    assert relative_error(out, plain) > 100 * TOLERANCE
    assert torch.equal(be.last_info["source"], st.source)
    assert "block 0" in be.report()
    # the heads are graph buffers read by get_attr nodes, not constants in node arguments
    (gm,) = graphs
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_tomec_dtem_")}
    buffers = dict(gm.named_buffers())
    wanted = {f"_tomec_dtem_{i}_{name}": tensor for i, block in enumerate(_block_weights(heads=heads))
              for name, tensor in block.items() if be.schedule[i] > 0}
    assert len(wanted) > 0 and reads == set(wanted)
    for attr, tensor in wanted.items():
        assert torch.equal(buffers[attr], tensor.to(buffers[attr].dtype)), attr
    for node in gm.graph.nodes:
        leaves = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
        assert not any(isinstance(a, torch.Tensor) for a in leaves), node.format_node()
