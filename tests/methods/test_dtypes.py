"""Every method's plain-PyTorch path (``impl="torch"``) in fp32, fp16 and bf16 (DESIGN.md, testing).

Tolerances follow DESIGN.md's rule: against a wider reference, the error may be at most twice the
error of plain PyTorch in the same dtype, plus a small absolute floor. ``DTYPES`` spells it per dtype
with the unit roundoff ``u = eps / 2``: a merged token is a weighted mean, which plain PyTorch rounds
``PLAIN_ROUNDINGS`` times (the weight, the product, the sum of the members, the division), so its
error is at most ``PLAIN_ROUNDINGS · u`` of the data's scale; ``rtol`` is twice that, ``atol`` the
floor (one ``u``), both relative to the data's scale (a mean of members of opposite signs has an
error relative to the members, not to itself).

Level 1, one block step (``tomec.methods.merge_step``; DCT: ``tomec.ops.dct_truncate``). Its inputs
are exactly representable in fp16 and in bf16, so every dtype sees the same values and the reference
is the same step on them in fp32 (the fp32 row: in fp64). Every matcher widens what decides a match
to fp32 before computing anything from it (the keys' head sum and the cosines, the attention
received, DiffRate's importance, ATC's distances), so in fp16/bf16 the destination map must EQUAL
the fp32 one, ties included: the decisions come from the same fp32 values, bit for bit. That is
checked on continuous values and on a grid full of exact ties that only the rounding of the scores
decides (``step_inputs``), where a map computed from fp16/bf16 scores goes elsewhere. Three methods
compute their metric in the activations' dtype before widening it: ATC and FPET average the keys
over heads (a rounding of the mean, see ``test_head_mean_is_widened_for_atc_and_fpet``), DTEM runs
its learned linear head (a layer of the model, legitimately in the model's dtype). Those three run on
the grid only, where that first step is exact in every dtype, so their maps must be equal too. The
fp32 row compares with fp64 on continuous values (no exact ties; a near tie would have to be within
fp32 rounding).

Level 2, a random-weight ``test_vit`` under ``tomec.reference.patch`` in fp16 and bf16 against the
same patched model in fp64; see ``test_patched_vit_low_precision``.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

import tomec
from tests.helpers import images, make_model
from tomec import reference

pytestmark = [
    # the defaults of these methods warn (random heads, no adapter, no counts): expected here
    pytest.mark.filterwarnings("ignore:dtem. no trained heads"),
    pytest.mark.filterwarnings("ignore:fpet. no refinement adapter"),
    pytest.mark.filterwarnings("ignore:ltmp. no counts"),
]

METHODS = tomec.methods.available()
PLAIN_ROUNDINGS = 4


def _rule(dtype: torch.dtype, name: str):
    u = torch.finfo(dtype).eps / 2
    return pytest.param(dtype, u, 2 * PLAIN_ROUNDINGS * u, id=name)  # (dtype, atol, rtol)


DTYPES = [_rule(torch.float32, "fp32"), _rule(torch.float16, "fp16"), _rule(torch.bfloat16, "bf16")]
LOW = DTYPES[1:]


def assert_rule(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """``max |out - ref| <= (rtol + atol) · max |ref|`` (twice plain PyTorch's error, plus the floor)."""
    assert out.shape == ref.shape, what
    scale = max(ref.abs().max().item(), 1.0)
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= (rtol + atol) * scale, f"{what}: error {err:.3g} > ({rtol:.2g} + {atol:.2g}) * {scale:.3g}"


# --- level 1: one block step ---------------------------------------------------------------------

BATCH, PROTECTED, SIDE, HEADS, HEAD_DIM, CHANNELS = 2, 1, 10, 4, 16, 32
N = PROTECTED + SIDE * SIDE  # a CLS token and a 10 x 10 patch grid (FPET needs a square grid)
COPIES = (N - PROTECTED) // 5  # tokens that are scaled copies of others, on the grid
PRE_ROUNDING = ("dtem",)  # its learned head runs in the activations' dtype (a model layer), then widened
# DCT's every output is a length-T dot product (its resampling matrix times the tokens): in fp32,
# where the sum itself rounds, plain PyTorch's rounding grows with its depth, log2(T) roundings
# instead of a mean's few (fp16/bf16 matmuls accumulate in fp32: a few roundings, as a mean)
DEPTH = {"dct": math.ceil(math.log2(N - PROTECTED)) / PLAIN_ROUNDINGS}

# Each method's step(s): r, the block and depth (methods that vary over depth), options.
STEPS = {
    "tome": [dict(r=30)],
    "tofu": [dict(r=30, layer=0, num_layers=4), dict(r=30, layer=3, num_layers=4)],  # prune; MLERP merge
    "pitome": [dict(r=30, layer=0, num_layers=2), dict(r=30, layer=1, num_layers=2)],  # bsm; top-2r
    "crossget": [dict(r=30)],
    "mctf": [dict(r=30)],
    # 10 pruned, then 20 merged
    "diffrate": [dict(r=30, options={"kept": {"prune_kept": [N - 10], "merge_kept": [N - 30]}})],
    "ltmp": [dict(r=30, options={"counts": {"merge": [20], "prune": [10]}}),  # 20 merged, 10 pruned
             dict(r=15, options={"counts": {"merge": [5], "prune": [10]}})],
    # r = COPIES - 1 and r = 8: the last merges choose among exactly tied (scaled-copy) pairs
    "atc": [dict(r=40), dict(r=COPIES - 1, options={"linkage": "complete"})],
    "fpet": [dict(r=30), dict(r=8)],
    "dtem": [dict(r=30)],
    "dct": [dict(r=30)],
}


def _representable(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to values that fp16 and bf16 both hold exactly (fp64)."""
    return t.to(torch.bfloat16).to(torch.float16).double()


def step_inputs(seed: int, grid: bool) -> dict[str, torch.Tensor]:
    """A block step's inputs in fp64, continuous or on a ``grid``.

    The grid makes every step before the widening exact in fp16 and bf16 and is full of ties: tokens
    and keys in multiples of 1/4 within [-4, 4] (the keys' head mean, a multiple of 1/16, is exact in
    bf16), DTEM's tokens and head in small integers (its embedding, integers below 256, is exact in
    bf16), and a fifth of the tokens are 3 x another token (x, keys, DTEM's tokens). A scaled copy
    ties with its original in exact arithmetic, but its norm rounds differently: the tie is decided
    by the rounding of the scores, which is why low precision must decide from the same fp32 scores
    (a map computed from fp16/bf16 scores goes the other way on some of them).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return _representable(torch.randn(*shape, generator=g))

    data = dict(
        x=randn(BATCH, N, CHANNELS),
        keys=randn(BATCH, HEADS, N, HEAD_DIM),
        queries=randn(BATCH, HEADS, N, HEAD_DIM),
        size=torch.randint(1, 4, (BATCH, N, 1), generator=g).double(),
    )
    if not grid:
        data["attn_in"] = randn(BATCH, N, CHANNELS)
        data["weight"] = _representable(torch.randn(8, CHANNELS, generator=g) / CHANNELS**0.5)
        data["bias"] = randn(8)
        return data
    for name in ("x", "keys"):
        data[name] = (data[name] * 4).round().clamp(-16, 16) / 4
    data["attn_in"] = torch.randint(-2, 3, (BATCH, N, CHANNELS), generator=g).double()
    data["weight"] = torch.randint(-1, 2, (8, CHANNELS), generator=g).double()
    data["bias"] = torch.zeros(8, dtype=torch.float64)  # a scaled token's embedding: scaled
    order = PROTECTED + torch.randperm(N - PROTECTED, generator=g)
    original, copy_ = order[:COPIES], order[COPIES : 2 * COPIES]
    data["keys"][:, :, copy_] = 3 * data["keys"][:, :, original]
    for name in ("x", "attn_in"):
        data[name][:, copy_] = 3 * data[name][:, original]
    return data


def run_step(method: str, data: dict[str, torch.Tensor], dtype: torch.dtype, r: int, layer: int = 0,
             num_layers: int = 1, options: dict | None = None):
    """``(dest, x, size)`` of the method's block step on ``data`` cast to ``dtype`` (DCT: no dest)."""
    t = {k: v.to(dtype) for k, v in data.items()}
    if method == "dct":
        return None, tomec.ops.dct_truncate(t["x"], N - r, PROTECTED, impl="torch"), None
    options = tomec.methods.get(method).make_options(options or {})
    params = {"weight": t["weight"], "bias": t["bias"]} if method == "dtem" else None  # DTEM's head
    x, size, dest = tomec.methods.merge_step(
        t["x"], t["size"], None, t["keys"], t["queries"], method=method, r=r, protected=PROTECTED,
        layer=layer, num_layers=num_layers, trace_source=True, impl="torch", options=options,
        attn_in=t["attn_in"], params=params,
    )
    return dest, x, size  # the source map of a first merge is its destination map


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_block_step_in_low_precision(method, dtype, atol, rtol):
    """The destination map equals the wider one exactly; merged tokens and sizes follow the rule."""
    wider = torch.float64 if dtype == torch.float32 else torch.float32
    if dtype == torch.float32:  # against fp64: continuous inputs, no exact ties
        grids = [False]
    else:  # the grid ties scores exactly; continuous keys need the head sum widened too
        grids = [True] if method in PRE_ROUNDING else [False, True]
    for seed, (setup, grid) in enumerate(itertools.product(STEPS[method], grids)):
        data = step_inputs(seed, grid)
        dest, x, size = run_step(method, data, dtype, **setup)
        dest_ref, x_ref, size_ref = run_step(method, data, wider, **setup)
        assert x.dtype == dtype and torch.isfinite(x).all()
        if dest is not None:
            assert torch.equal(dest, dest_ref), f"{setup}, grid={grid}: {int((dest != dest_ref).sum())} differ"
            assert sorted(set(dest[0].tolist()) - {-1}) == list(range(x.shape[1]))  # every slot used
            assert size.dtype == dtype
            assert_rule(size, size_ref, atol, rtol, f"{setup}: sizes")
        depth = DEPTH.get(method, 1) if dtype == torch.float32 else 1
        assert_rule(x, x_ref, atol, rtol * depth, f"{setup}: tokens")


@pytest.mark.parametrize("method,seed", [("atc", 5), ("fpet", 0)])
def test_head_mean_is_widened_for_atc_and_fpet(method, seed):
    """Continuous bf16 keys: the map must equal the one from the same keys in fp32, as ToMe's does
    (its head sum is widened). Rounding the head mean to bf16 first (as ATC and FPET once did) sends
    31 (ATC) and 27 (FPET) tokens elsewhere on these seeds."""
    keys = torch.randn(2, 4, 101, 16, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    match = {
        "atc": lambda k: tomec.ops.atc_match(k, 40, 1),
        "fpet": lambda k: tomec.ops.fpet_match(k, 8, 1)[0],
        "tome": lambda k: tomec.ops.bipartite_match(k, 30, 1),
    }
    assert torch.equal(match["tome"](keys), match["tome"](keys.float()))
    assert torch.equal(match[method](keys), match[method](keys.float()))


# --- level 2: a whole model ----------------------------------------------------------------------

R = 40  # of test_vit's 101 tokens, over its 6 blocks


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def partition(source: torch.Tensor) -> torch.Tensor:
    """A source map up to the order of its slots: each original token's lowest fellow member (-1:
    dropped)."""
    same = source.unsqueeze(-1) == source.unsqueeze(-2)
    return torch.where(source >= 0, same.int().argmax(-1), -1)


@pytest.fixture(scope="module")
def vit():
    """test_vit, two images, the unmerged logits in fp64 and the unmerged model's own relative error
    in each low dtype (plain PyTorch's error in the rule)."""
    model, x = make_model("test_vit"), images("test_vit", 2)
    with torch.no_grad():
        plain = copy.deepcopy(model).double()(x.double())
        plain_err = {p.values[0]: relative(copy.deepcopy(model).to(p.values[0])(x.to(p.values[0])), plain)
                     for p in LOW}
    return model, x, plain, plain_err


def patched(model, method, dtype, x):
    """Logits and reference state of ``model`` patched with ``method`` (r=R), run in ``dtype``."""
    spec = tomec.methods.get(method)
    m = reference.patch(copy.deepcopy(model).to(dtype), method, r=R, trace_source=spec.supports_source)
    with torch.no_grad():
        out = m(x.to(dtype))
    return out, reference.state(m)


@pytest.mark.parametrize("dtype,atol,rtol", LOW)
@pytest.mark.parametrize("method", METHODS)
def test_patched_vit_low_precision(vit, method, dtype, atol, rtol):
    """The patched model in fp16/bf16: logits in that dtype, finite, the same schedule and token
    counts as in fp64, and the rule against fp64 with the unmerged model's own error in ``dtype``
    as plain PyTorch's (``atol``: the floor, relative to the logits' scale).

    Low precision changes the activations, so a merge decision within rounding of a tie may go the
    other way; on this random-weight model PiToMe's energy order and MCTF's pair scores do so on every
    seed tried, fp16 included. Where the final partition of the tokens (the source map up to slot
    order) equals fp64's, the decisions were the same and the rule applies as it is; where it
    differs, the bound adds the merge's own effect in fp64 (|merged - unmerged|): the low-precision
    model may then be no further from the fp64 merged model than merging moves it, plus the rule.
    """
    model, x, plain, plain_err = vit
    out, st = patched(model, method, dtype, x)
    exact, st64 = patched(model, method, torch.float64, x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert st.schedule == st64.schedule and st.tokens_per_block == st64.tokens_per_block
    assert sum(st.schedule) == R
    err, bound = relative(out, exact), 2 * plain_err[dtype] + atol
    same = st.source is None or torch.equal(partition(st.source), partition(st64.source))
    if not same:
        bound += relative(exact, plain)
    assert err <= bound, f"relative error {err:.3g} > {bound:.3g} (same decisions: {same})"
