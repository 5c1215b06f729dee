"""MCTF: attention received and the bidirectional matching against their oracles (fp64), properties,
option errors, model parity."""

from __future__ import annotations

import itertools

import pytest
import torch

import tomec
from tests.helpers import check_parity, compile_tomec, images, make_model, relative_error, tie_metric
from tests.helpers import TOLERANCE, reference_of
from tests.oracles import mctf as oracle
from tests.oracles import tome as tome_oracle
from tomec import methods
from tomec.errors import ConfigError
from tomec.ops import attention_received
from tomec.methods.mctf import mctf_match

DEFAULTS = {"tau_sim": 1.0, "tau_info": 20.0, "tau_size": 40.0}
TAUS = [DEFAULTS, {"tau_sim": 0.0, "tau_info": 20.0, "tau_size": 40.0},
        {"tau_sim": 1.0, "tau_info": 0.0, "tau_size": 40.0}, {"tau_sim": 2.0, "tau_info": 20.0, "tau_size": 0.0},
        {"tau_sim": 0.0, "tau_info": 0.0, "tau_size": 0.0}]


def inputs(n, seed, heads=2, with_size=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 6, dtype=dtype, generator=g)
    q, k = (torch.randn(2, heads, n, 4, dtype=dtype, generator=g) for _ in range(2))
    size = torch.randint(1, 5, (2, n, 1), generator=g).to(dtype) if with_size else None
    return x, q, k, size


def rs(n, protected):
    cap = (n - protected) // 2
    return sorted({0, 1, cap // 2, cap})


def check_against_oracle(x, q, k, size, protected, taus, bidirectional, prop_attn=True, scale=None):
    for r in rs(x.shape[1], protected):
        dest, w, sizes = mctf_match(x, q, k, size, r, protected, **taus, bidirectional=bidirectional,
                                    prop_attn=prop_attn, scale=scale)
        want, recv = oracle.mctf_match(x, q, k, size, r, protected, bidirectional=bidirectional,
                                       prop_attn=prop_attn, scale=scale, **taus)
        assert torch.equal(dest, torch.tensor(want)), (r, dest.tolist(), want)
        expect_size = torch.ones_like(x[..., :1]) if size is None else size
        recv = torch.tensor(recv, dtype=x.dtype)
        recv = recv / recv.amax(-1, keepdim=True)  # weights are scaled per image (same means)
        torch.testing.assert_close(w, recv[..., None] * expect_size, rtol=1e-12, atol=1e-15)
        assert torch.equal(sizes, expect_size)


# --- against the oracle ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,protected", [(8, 0), (9, 1), (12, 2), (13, 3), (10, 1)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_equals_oracle(n, protected, bidirectional):
    for i, taus in enumerate(TAUS):
        x, q, k, size = inputs(n, seed=10 * n + i, with_size=i % 2 == 0)
        check_against_oracle(x, q, k, size, protected, taus, bidirectional, prop_attn=i != 3,
                             scale=0.3 if i == 1 else None)


@pytest.mark.parametrize("n,protected", [(15, 1), (16, 2)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_ties_equal_oracle(n, protected, bidirectional):
    # zero queries attend uniformly (every token receives the same attention), sizes repeat, and
    # tokens with four ones of 16 have cosines in multiples of 1/4: many pair scores tie exactly
    g = torch.Generator().manual_seed(n)
    x = tie_metric(2, 4, seed=n)[:, torch.randint(0, 4, (n,), generator=g)]
    q = torch.zeros(2, 2, n, 4, dtype=torch.float64)
    k = torch.randn(2, 2, n, 4, dtype=torch.float64, generator=g)
    size = torch.randint(1, 3, (2, n, 1), generator=g).double()
    for taus in (DEFAULTS, {"tau_sim": 1.0, "tau_info": 0.0, "tau_size": 0.0}):
        check_against_oracle(x, q, k, size, protected, taus, bidirectional)


def test_one_way_is_tome_on_the_similarity_alone():
    # similarity only, one direction: ToMe's matching on x (the power is monotonic)
    x, q, k, size = inputs(17, seed=5)
    for protected, r in [(1, 8), (2, 5), (0, 3)]:
        dest, _, _ = mctf_match(x, q, k, size, r, protected, tau_sim=1.0, tau_info=0.0, tau_size=0.0,
                                bidirectional=False)
        assert torch.equal(dest, tome_oracle.bipartite_match(x, r, protected))


def test_bidirectional_moves_b_tokens_and_their_groups():
    x, q, k, size = inputs(41, seed=7)
    dest, _, _ = mctf_match(x, q, k, size, 20, 1)
    a_slots, b_slots = dest[:, 2::2], dest[:, 1::2]
    n_kept_a = 20 - 10  # non-protected A tokens left after 10 merges A -> B
    assert (b_slots < 1 + n_kept_a).sum(1).eq(10).all()  # 10 B tokens went to A slots
    assert (a_slots < 1 + n_kept_a).any()
    one_way, _, _ = mctf_match(x, q, k, size, 12, 1, bidirectional=False)  # 8 A tokens stay
    assert torch.equal(one_way[:, 1::2], torch.arange(1 + 8, 1 + 28).expand(2, 20))  # B kept, in order


def test_a_disabled_criterion_ignores_its_input():
    x, q, k, size = inputs(21, seed=3)
    q2, size2 = torch.randn_like(q), torch.randint(1, 9, size.shape).double()
    r, p = 9, 1
    no_info = {"tau_sim": 1.0, "tau_info": 0.0, "tau_size": 40.0}
    assert torch.equal(mctf_match(x, q, k, size, r, p, **no_info)[0], mctf_match(x, q2, k, size, r, p, **no_info)[0])
    no_size = {"tau_sim": 1.0, "tau_info": 20.0, "tau_size": 0.0}
    assert torch.equal(mctf_match(x, q, k, size, r, p, **no_size, prop_attn=False)[0],
                       mctf_match(x, q, k, size2, r, p, **no_size, prop_attn=False)[0])
    # and an enabled one does not (a strong criterion, so the test can fail)
    strong_info = {"tau_sim": 1.0, "tau_info": 0.05, "tau_size": 0.0}
    assert not torch.equal(mctf_match(x, q, k, size, r, p, **strong_info)[0],
                           mctf_match(x, q2, k, size, r, p, **strong_info)[0])


# --- attention received ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("prop_attn,with_size", [(True, True), (False, True), (True, False)])
def test_attention_received_is_the_column_mean(dtype, prop_attn, with_size):
    x, q, k, size = inputs(19, seed=2, heads=3, with_size=with_size, dtype=dtype)
    scale = 0.4
    got = attention_received(q, k, size, scale, prop_attn)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if prop_attn and with_size:
        logits = logits + size.double().log()[:, None, None, :, 0]
    want = logits.softmax(-1).mean(dim=(1, 2))
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got.double().sum(-1), torch.ones(2, dtype=torch.float64), rtol=tol, atol=tol)
    if dtype == torch.float64:
        torch.testing.assert_close(got, torch.tensor(oracle.attention_received(q, k, size, scale, prop_attn), dtype=dtype),
                                   rtol=1e-12, atol=1e-15)


# --- properties -----------------------------------------------------------------------------------


def test_every_r_up_to_the_cap_is_a_valid_map():
    """Brute force over small N, P and every r <= the cap, both modes: slots in range and non-empty,
    protected tokens first and in place (the cap never asks for the impossible)."""
    cap_of = methods.get("mctf").cap
    for n, protected in itertools.product(range(2, 13), range(0, 5)):
        if protected > n:
            continue
        x, q, k, size = inputs(n, seed=n + 100 * protected, heads=1)
        for bidirectional in (True, False):
            for r in range(cap_of(n, protected) + 1):
                dest, _, _ = mctf_match(x, q, k, size, r, protected, bidirectional=bidirectional)
                assert dest.min() >= 0 and dest.max() == n - r - 1
                for b in range(2):
                    assert torch.bincount(dest[b], minlength=n - r).min() >= 1, (n, protected, r)
                assert torch.equal(dest[:, :protected], torch.arange(protected).expand(2, protected))
    assert cap_of(197, 1) == 98 and cap_of(198, 2) == 98 and cap_of(3, 5) == 0
    with pytest.raises(ConfigError, match="r=99 is outside"):
        mctf_match(*inputs(197, seed=0, heads=1), 99, 1)


def test_merge_weights_are_attention_times_size():
    x, q, k, size = inputs(11, seed=4)
    dest, w, _ = mctf_match(x, q, k, size, 4, 1, scale=0.5)
    recv = attention_received(q, k, size, 0.5)
    torch.testing.assert_close(w, (recv / recv.amax(-1, keepdim=True)).unsqueeze(-1) * size)
    out, out_size = tomec.ops.merge(x, size, dest, 7, w)
    for b in range(2):
        for s in range(7):
            members = dest[b] == s
            ww = w[b, members]
            torch.testing.assert_close(out[b, s], (ww * x[b, members]).sum(0) / ww.sum())
            assert out_size[b, s, 0] == size[b, members].sum()


def test_half_precision_returns_its_dtype():
    x, q, k, size = inputs(23, seed=6, dtype=torch.float16)
    dest, w, sizes = mctf_match(x, q, k, size, 10, 1)
    assert dest.dtype == torch.int64 and w.dtype == torch.float16 and sizes.dtype == torch.float16
    assert torch.isfinite(w).all()


# --- options --------------------------------------------------------------------------------------


def test_defaults_are_the_official_deit_s_values():
    spec = methods.get("mctf")
    assert spec.make_options({}).as_dict() == {"tau_sim": 1.0, "tau_info": 20.0, "tau_size": 40.0,
                                      "bidirectional": True, "one_step_ahead": True}
    assert spec.make_options({"tau_info": 0}).tau_info == 0.0


@pytest.mark.parametrize(
    "options,message",
    [
        ({"tau_sim": -1}, "tau_sim must be a finite number >= 0"),
        ({"tau_info": True}, "tau_info must be a finite number >= 0"),
        ({"tau_size": float("nan")}, "tau_size must be a finite number >= 0"),
        ({"tau_size": float("inf")}, "tau_size must be a finite number >= 0"),
        ({"tau_info": "20"}, "tau_info must be a finite number >= 0"),
        ({"bidirectional": 1}, "bidirectional must be True or False"),
        ({"one_step_ahead": 1}, "one_step_ahead must be True or False"),
        ({"tau": 1}, "method 'mctf' has no option 'tau'; its options are: bidirectional, one_step_ahead"),
    ],
)
def test_option_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        tomec.backend(method="mctf", r=10, **options)


def test_op_errors():
    x, q, k, size = inputs(9, seed=0)
    with pytest.raises(ConfigError, match="tau_sim must be >= 0"):
        mctf_match(x, q, k, size, 2, 1, tau_sim=-0.5)
    with pytest.raises(ConfigError, match="protected=10 is outside"):
        mctf_match(x, q, k, size, 0, 10)
    with pytest.raises(ConfigError, match=r"r=5 is outside \[0, 4\]"):
        mctf_match(x, q, k, size, 5, 1)


# --- model parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fused,batch,prop_attn", [(True, 1, True), (False, 2, False)]
)
def test_model_parity(fused, batch, prop_attn):
    check_parity("test_vit", fused, batch, prop_attn=prop_attn, method="mctf", trace_source=True)


def test_model_parity_one_way_and_options():
    # check_parity hands method options to the backend only: compare with the reference here
    model, x = make_model("test_vit"), images("test_vit", 2)
    options = {"bidirectional": False, "tau_size": 0.0, "tau_sim": 2.0}
    compiled, be = compile_tomec(model, method="mctf", r=40, compiler="eager", **options)
    ref = reference_of(model, method="mctf", r=40, **options)
    default = reference_of(model, method="mctf", r=40)
    with torch.no_grad():
        out, expect, other = compiled(x), ref(x), default(x)
    assert relative_error(out, expect) <= TOLERANCE
    assert relative_error(out, other) > 1e-2  # the options reach the matcher




def _official_forward(model, x, schedule, prop_attn):
    """mlvlab/MCTF's ``one_step_ahead=1`` block by block, from the oracle's matches: at a merging
    block, its attention on the unmerged tokens (with the log-size bias) picks the merge; tokens
    merge with weights attention received × size, the attention map with them (key columns summed,
    query rows weighted the same way), and the attention output is that map times the values of
    the merged tokens."""
    from tomec.train import vit

    tokens, size = vit.embed(model, x), None
    for layer, block in enumerate(model.blocks):
        r = schedule[layer]
        bias = size if prop_attn else None
        if r == 0:
            out = vit.attention(block.attn, block.norm1(tokens), bias, explicit=True).out
        else:
            _, q, k, probs = vit.attention(block.attn, block.norm1(tokens), bias, explicit=True)
            dest, recv = oracle.mctf_match(tokens, q, k, size, r, 1, 1.0, 20.0, 40.0, True,
                                           scale=block.attn.scale, prop_attn=prop_attn)
            n, n_out = tokens.shape[1], tokens.shape[1] - r
            sizes = torch.ones(x.shape[0], n, 1, dtype=x.dtype) if size is None else size
            w = torch.tensor(recv, dtype=x.dtype) * sizes[..., 0]  # [B, N]
            member = (torch.tensor(dest).unsqueeze(1) == torch.arange(n_out).view(1, -1, 1)).to(x.dtype)
            weighted = member * w.unsqueeze(1)  # [B, n_out, N]
            tokens = (weighted @ tokens) / weighted.sum(-1, keepdim=True)
            size = member @ sizes
            cols = torch.einsum("bhqk,bok->bhqo", probs, member)
            merged = torch.einsum("bon,bhnk->bhok", weighted, cols) / weighted.sum(-1)[:, None, :, None]
            attn = block.attn
            b, m, c = tokens.shape
            v = attn.qkv(block.norm1(tokens)).reshape(b, m, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
            out = attn.proj((merged @ v).transpose(1, 2).reshape(b, m, c))
        tokens = tokens + block.ls1(out)
        tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
    return model.forward_head(model.norm(tokens))


@pytest.mark.parametrize("fused,prop_attn", [(True, True), (False, False)])
def test_one_step_ahead_equals_the_official_forward(fused, prop_attn):
    model = make_model("test_vit", fused, depth=4, img_size=96).double()  # 37 tokens
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    schedule = [0, 6, 6, 4]  # block 0 left alone, as the official DeiT setting
    compiled, be = compile_tomec(model, method="mctf", schedule=schedule, compiler="eager",
                                 prop_attn=prop_attn)
    ref = reference_of(model, method="mctf", schedule=schedule, prop_attn=prop_attn)
    after = reference_of(model, method="mctf", schedule=schedule, prop_attn=prop_attn,
                         one_step_ahead=False)
    with torch.no_grad():
        want = _official_forward(model, x, schedule, prop_attn)
        got, got_ref, other = compiled(x), ref(x), after(x)
    assert relative_error(got_ref, want) <= 1e-10 and relative_error(got, want) <= 1e-10
    assert relative_error(other, want) > 1e-4  # the site after the attention residual differs
    assert be.tokens_per_block == [37, 37, 31, 25]


def test_the_official_floor_of_ten_tokens():
    assert methods.mctf_cap(197, 1) == 98 and methods.mctf_cap(21, 1) == 10
    assert methods.mctf_cap(15, 1) == 5 and methods.mctf_cap(10, 1) == 0 and methods.mctf_cap(5, 1) == 0
    from tomec.config import TomecConfig
    from tomec.errors import ScheduleError

    with pytest.raises(ScheduleError, match="schedule\\[3\\]=8 exceeds block 3's cap of 3"):
        TomecConfig(method="mctf", schedule=[0, 8, 8, 8]).resolve_schedule(4, 29, 1)


def test_one_step_ahead_leaves_block_0_alone_and_its_flops_are_the_official_forms():
    from tomec.config import TomecConfig
    from tomec.flops import per_block_macs

    assert TomecConfig(method="mctf", r=33).resolve_schedule(12, 197, 1)[0] == 0
    assert TomecConfig(method="mctf", r=33, method_options={"one_step_ahead": False}).resolve_schedule(
        12, 197, 1)[0] > 0
    n, r, c = 197, 16, 384
    m = n - r
    want = 2 * n * c * c + n * n * c + 2 * m * c * c + m * m * c + 8 * m * c * c
    assert per_block_macs(n, [r], c, 4.0, site="ahead") == [want]


@pytest.mark.slow
def test_one_step_ahead_inductor_equals_reference():
    model, x = make_model("test_vit", depth=3), images("test_vit", 2)
    compiled, be = compile_tomec(model, method="mctf", r=24)
    ref = reference_of(model, method="mctf", r=24)
    with torch.no_grad():
        assert relative_error(compiled(x), ref(x)) <= TOLERANCE


def test_tokens_receiving_no_attention_keep_finite_weights_in_half_precision():
    """A key opposite to every query receives ~1e-30 of the attention: the fp16 weights must not
    underflow to 0, or merging such tokens divides 0 by 0."""
    n, heads, d = 9, 1, 8
    q = torch.ones(1, heads, n, d)
    k = torch.ones(1, heads, n, d)
    k[:, :, 5:] = -20.0  # tokens 5..8 get (almost) nothing
    x = torch.randn(1, n, 16, generator=torch.Generator().manual_seed(0))
    for r in (1, 2, 3, 4):
        dest, w, sizes = mctf_match(x.half(), q.half(), k.half(), None, r, 1, tau_info=0.0)
        out, _ = tomec.ops.merge(x.half(), sizes, dest, n - r, w)
        assert (w > 0).all() and torch.isfinite(out).all(), r


@pytest.mark.parametrize("n_dropped", [0, 2])
def test_merge_attention_equals_the_dense_formula(n_dropped):
    g = torch.Generator().manual_seed(5)
    b, h, n, n_out = 2, 3, 12, 7
    probs = torch.rand(b, h, n, n, dtype=torch.float64, generator=g).softmax(-1)
    dest = torch.stack([torch.randperm(n, generator=g) % n_out for _ in range(b)])
    dest[:, n - n_dropped:] = -1 if n_dropped else dest[:, n - n_dropped:]
    dest[:, :n_out] = torch.arange(n_out)  # every slot has a member
    w = torch.rand(b, n, 1, dtype=torch.float64, generator=g) + 0.1
    member = (dest.unsqueeze(1) == torch.arange(n_out).view(1, -1, 1)).double()  # [B, n_out, N]
    cols = torch.einsum("bhqk,bok->bhqo", probs, member)
    rows = member * w.transpose(1, 2)
    want = torch.einsum("bon,bhnk->bhok", rows, cols) / rows.sum(-1)[:, None, :, None]
    got = tomec.ops.merge_attention(probs, dest, w, n_out, n_dropped)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if n_dropped == 0:
        torch.testing.assert_close(got.sum(-1), torch.ones(b, h, n_out, dtype=torch.float64))


def test_one_step_ahead_keeps_in_place_calls_elsewhere_in_the_graph():
    # the replaced attention branches are erased, not the graph's other unused results (an
    # in-place call's result is unused, its effect is not)
    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = make_model("test_vit", depth=3)

        def forward(self, x):
            y = self.vit.forward_features(x)
            y.mul_(2.0)
            return self.vit.forward_head(y)

    model, x = Doubled().eval(), images("test_vit", 2)
    compiled, _ = compile_tomec(model, method="mctf", r=20, compiler="eager")
    ref = reference_of(model, method="mctf", r=20, protect=1)  # the wrapper has no num_prefix_tokens
    with torch.no_grad():
        assert relative_error(compiled(x), ref(x)) <= TOLERANCE
