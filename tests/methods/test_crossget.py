"""CrossGET (vision-only): the op against its oracle (fp64), properties, options, model parity."""

from __future__ import annotations

import pytest
import torch

import tomec
from tests.helpers import check_parity, compile_tomec, images, make_model, relative_error, tie_metric
from tests.oracles import crossget as oracle
from tomec import methods
from tomec.errors import ConfigError, ScheduleError
from tomec.methods.crossget import concat_heads, crossget_importance, crossget_match
from tomec.ops import cosine as _cosine

SHAPES = [(5, 0), (6, 1), (17, 1), (18, 2), (33, 3), (64, 0), (41, 3)]


def rs(n, protected):
    cap = (n - protected) // 2
    return sorted({0, 1, cap // 2, cap})


def qk(n, seed, heads=3, d=8, batch=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, d, dtype=dtype, generator=g) for _ in range(2))


# --- against the oracle ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("n,protected", SHAPES)
def test_equals_oracle(n, protected, with_size):
    for seed in range(3):
        q, k = qk(n, seed=100 * seed + n)
        size = torch.randint(1, 5, (2, n, 1), generator=torch.Generator().manual_seed(seed)).double()
        size = size if with_size else None
        for r in rs(n, protected):
            dest, w, s = crossget_match(k, q, r, protected, size=size)
            want_dest, want_w = oracle.crossget_match(k, q, r, protected, size)
            assert torch.equal(dest, want_dest), (seed, r)
            torch.testing.assert_close(w, want_w, rtol=1e-12, atol=1e-12)
            assert s is size if size is not None else torch.equal(s, torch.ones(2, n, 1, dtype=k.dtype))


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("n,protected", [(17, 1), (32, 0), (41, 3), (24, 2)])
def test_ties_equal_oracle(n, protected, guided):
    # tokens with four ones out of 16: every cosine is a multiple of 1/4, so similarities,
    # importances and adjusted scores are exact and tie everywhere; guided=False ties all importances
    for seed in range(3):
        metric, query = tie_metric(2, n, seed=n + seed), tie_metric(2, n, seed=1000 + n + seed)
        for r in rs(n, protected):
            dest, _, _ = crossget_match(metric, query, r, protected, guided=guided)
            if guided:
                want = oracle.crossget_match(metric, query, r, protected)[0]
            else:
                want = _unguided_oracle(metric, r, protected)
            assert torch.equal(dest, want), (seed, r)


def _unguided_oracle(metric, r, protected):
    """The oracle with no importance: a guide query orthogonal to every token (cosine exactly 0)."""
    batch, n, d = metric.shape
    pad = torch.zeros(batch, n, 1, dtype=metric.dtype)
    guide = torch.zeros(batch, n, d + 1, dtype=metric.dtype)
    guide[..., -1] = 1.0
    return oracle.crossget_match(torch.cat([metric, pad], -1), guide, r, protected)[0]


def test_mutual_best_pair_ties_go_to_the_lower_index():
    # two tokens whose best partners are each other tie on their best similarity in exact
    # arithmetic; float rounding of the two products must not decide which is ranked first
    q, k = qk(6, seed=6)
    for dtype in (torch.float64, torch.float32):
        dest, _, _ = crossget_match(k.to(dtype), q.to(dtype), 2, 1)
        assert torch.equal(dest, oracle.crossget_match(k, q, 2, 1)[0])


def test_heads_are_concatenated_not_summed():
    # Token 1's heads are (e0, e1) and token 2's (e1, e0): summed over heads they are the same
    # vector (cosine 1), concatenated orthogonal (cosine 0), so token 1's partner is 2 under the
    # head sum and 3 (cosine 0.95 either way) under the official concatenation.
    k = torch.zeros(1, 2, 5, 2, dtype=torch.float64)
    k[0, :, 0] = torch.tensor([[0.3, -1.0], [-1.0, 0.2]])  # the CLS, unlike the rest
    k[0, :, 1] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k[0, :, 2] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    k[0, :, 3] = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    k[0, :, 4] = torch.tensor([[-1.0, 0.1], [-0.3, -1.0]])
    q = torch.randn(1, 2, 5, 2, dtype=torch.float64)  # unguided: the similarity alone decides
    concat = _cosine(concat_heads(k), concat_heads(k))[0]
    summed = _cosine(k.sum(1), k.sum(1))[0]
    assert concat[1, 2] == 0 and summed[1, 2] > 0.999 and concat[1, 3] > 0.9
    for r in (1, 2):
        dest, _, _ = crossget_match(k, q, r, 1, guided=False)
        assert torch.equal(dest, _unguided_oracle(concat_heads(k), r, 1)), r
    # the head-sum metric would merge token 1 into 2; the official metric puts 1 with 3
    dest, _, _ = crossget_match(k, q, 1, 1, guided=False)
    old, _, _ = crossget_match(k.sum(1), q.sum(1), 1, 1, guided=False)
    assert not torch.equal(dest, old)


# --- properties -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,protected", SHAPES)
def test_destination_map_properties(n, protected):
    q, k = qk(n, seed=n, dtype=torch.float32)
    for r in rs(n, protected):
        dest, w, _ = crossget_match(k, q, r, protected)
        n_out = n - r
        assert dest.dtype == torch.int64 and ((dest >= 0) & (dest < n_out)).all()
        for b in range(2):
            counts = torch.bincount(dest[b], minlength=n_out)
            assert (counts >= 1).all()  # every slot non-empty
            assert torch.equal(dest[b, :protected], torch.arange(protected))  # protected first
            assert _kept_in_order(dest[b], n_out)
        assert (w > 0).all()
        if r == 0:
            assert torch.equal(dest, torch.arange(n).expand(2, n))


def _kept_in_order(dest: torch.Tensor, n_out: int) -> bool:
    """One member per slot can be the slot's kept token with the kept tokens in increasing order
    (greedy: each slot takes its first member after the previous slot's)."""
    previous = -1
    for slot in range(n_out):
        later = [i for i in (dest == slot).nonzero()[:, 0].tolist() if i > previous]
        if not later:
            return False
        previous = later[0]
    return True


def test_kept_order_check_can_fail():
    assert _kept_in_order(torch.tensor([0, 1, 1, 2]), 3)
    assert not _kept_in_order(torch.tensor([0, 2, 1, 1]), 3)  # slot 2 has nothing after slot 1's


def test_pair_weights_are_the_official_softmax():
    # one source into one destination of equal size: the merged token is the softmax (over the two)
    # of their importances times their values, as the official reducer computes it
    n, protected, r = 17, 1, 1
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, n, 5, dtype=torch.float64, generator=g)
    q, k = qk(n, seed=4)
    dest, w, size = crossget_match(k, q, r, protected, x=x)
    out, out_size = tomec.ops.merge(x, size, dest, n - r, w)
    imp = crossget_importance(k, q, protected)
    for b in range(2):
        slot = int(torch.bincount(dest[b]).argmax())  # the one slot with two members
        i, j = (dest[b] == slot).nonzero()[:, 0].tolist()
        p = torch.softmax(torch.stack([imp[b, i], imp[b, j]]), 0)  # symmetric in the two members
        torch.testing.assert_close(out[b, slot], p[0] * x[b, i] + p[1] * x[b, j])
        assert out_size[b, slot, 0] == 2


def test_scoring_in_fp32_and_weights_in_the_tokens_dtype():
    q, k = qk(33, seed=5, dtype=torch.float32)
    x = torch.randn(2, 33, 8)
    want = crossget_match(k, q, 10, 1)[0]
    got, w, _ = crossget_match(k.half(), q.half(), 10, 1, x=x.half())
    assert w.dtype == torch.float16
    wide = crossget_match(k.half().float(), q.half().float(), 10, 1)[0]
    assert torch.equal(got, wide)  # fp16 activations, scored exactly as their fp32 values
    assert (got == want).float().mean() > 0.8


def test_r0_merge_step_is_the_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 8, generator=g)
    k, q = (torch.randn(2, 2, 9, 4, generator=g) for _ in range(2))
    out, size, _ = methods.merge_step(x, None, None, k, q, method="crossget", r=0, protected=1, layer=0,
                                      num_layers=2, options={"guided": True})
    assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 9, 1))


# --- options and errors ---------------------------------------------------------------------------


def test_option_errors():
    with pytest.raises(ConfigError, match="crossget: guided must be True or False, got 'yes'"):
        tomec.backend(method="crossget", r=10, guided="yes")
    with pytest.raises(ConfigError, match="method 'crossget' has no option 'guide'; its options are: guided"):
        tomec.backend(method="crossget", r=10, guide=True)
    q, k = qk(9, seed=0)
    with pytest.raises(ConfigError, match=r"r=5 is outside \[0, 4\] for 9 tokens with 1 protected"):
        crossget_match(k, q, 5, 1)
    with pytest.raises(ConfigError, match="queries .* do not match"):
        crossget_match(k, q[:, :, :8], 2, 1)
    assert methods.get("crossget").cap(197, 1) == 98


def test_schedule_over_the_cap_names_the_numbers():
    config = tomec.TomecConfig(method="crossget", schedule=[60, 0])
    with pytest.raises(ScheduleError, match="cap of 48"):
        config.resolve_schedule(2, 97, 1)


# --- models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fused,batch,prop_attn", [(True, 1, True), (False, 2, False)]  # each setting, both ways
)
def test_model_parity(fused, batch, prop_attn):
    check_parity("test_vit", fused, batch, prop_attn=prop_attn, method="crossget", trace_source=True)


def test_unguided_changes_the_answer():
    model = make_model("test_vit", depth=2)
    x = images("test_vit", 1)
    guided, _ = compile_tomec(model, method="crossget", r=40, compiler="eager")
    with torch.no_grad():
        a = guided(x)
    plain, _ = compile_tomec(model, method="crossget", r=40, compiler="eager", guided=False)
    with torch.no_grad():
        b = plain(x)
    assert relative_error(a, b) > 1e-3
