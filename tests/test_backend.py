"""Model-level parity: compiled tomec against the eager reference patch (DESIGN.md, testing, 4).

The full matrix (models × batch × attention form × prop_attn) runs with ``compiler="eager"``: the
same rewritten graph, executed without Inductor. Inductor compiles cost tens of seconds each on two
cores, so the ``slow`` tests cover every value of every axis under Inductor without the full product.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tomec
from tests.helpers import (
    TOLERANCE,
    check_parity,
    compile_tomec,
    images,
    make_model,
    reference_of,
    relative_error,
)
from tomec import reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name,fused,batch,prop_attn",
    list(itertools.product(["test_vit", "deit_tiny_patch16_224"], [True, False], [1, 4], [True, False])),
)
def test_parity_eager_compiler(name, fused, batch, prop_attn):
    check_parity(name, fused, batch, prop_attn, compiler="eager")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,fused,batch,prop_attn",
    [
        ("test_vit", True, 4, True),
        ("test_vit", False, 1, True),
        ("test_vit", True, 1, False),
        ("deit_tiny_patch16_224", True, 4, True),  # manual attention: test_vit above
    ],
)
def test_parity_inductor(name, fused, batch, prop_attn):
    check_parity(name, fused, batch, prop_attn, compiler="inductor")


@pytest.mark.parametrize("compiler", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_r0_equals_unmerged(compiler):
    model = make_model("test_vit")
    x = images("test_vit", 2)
    compiled, be = compile_tomec(model, r=0, compiler=compiler)
    with torch.no_grad():
        out = compiled(x)
        if compiler == "inductor":
            torch._dynamo.reset()
            plain = torch.compile(model, fullgraph=True)(x)
            assert torch.equal(out, plain)  # same graph, same kernels: bitwise
        expect = model(x)
    assert be.schedule == [0] * 6
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    if compiler == "eager":
        assert torch.equal(out, expect)


@pytest.mark.parametrize("compiler", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_second_batch_size_recompiles_and_stays_correct(compiler):
    model, compiled, be, ref, _ = check_parity("test_vit", True, 4, True, compiler)
    x2 = images("test_vit", 3, seed=7)
    with torch.no_grad():
        out, expect = compiled(x2), ref(x2)
    assert relative_error(out, expect) <= TOLERANCE
    assert be.tokens_per_block == reference.state(ref).tokens_per_block
    assert len(be.compile_seconds) == 2  # one graph per batch size (the second with a symbolic batch)


def test_trace_source_matches_reference_and_sizes():
    model = make_model("test_vit")
    x = images("test_vit", 2)
    compiled, be = compile_tomec(model, r=40, compiler="eager", trace_source=True)
    ref = reference_of(model, method="tome", r=40, trace_source=True)
    with torch.no_grad():
        out, expect = compiled(x), ref(x)
    assert relative_error(out, expect) <= TOLERANCE
    info, st = be.last_info, reference.state(ref)
    assert info["source"].shape == (2, 101) and info["num_protected"] == 1
    assert torch.equal(info["source"], st.source)
    torch.testing.assert_close(info["size"], st.size)
    for b in range(2):  # every original token in exactly one final token; counts equal sizes
        counts = torch.bincount(info["source"][b], minlength=info["size"].shape[1])
        assert torch.equal(counts.to(info["size"].dtype), info["size"][b, :, 0])
    assert info["source"][:, 0].eq(0).all()  # CLS stays first, alone
    assert info["size"][:, 0, 0].eq(1).all()


def recorded_run(model, x, **kwargs):
    """Compile ``model`` afresh with tomec (``compiler="eager"``) and run it on ``x``: the logits,
    the resolved schedule and the Python code of each rewritten graph."""
    be, codes = tomec.backend(compiler="eager", **kwargs), []

    def spy(gm, example_inputs, **options):
        fn = be(gm, example_inputs, **options)
        codes.append(fn.__self__.code)  # eager: the rewritten GraphModule's forward
        return fn

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=spy, fullgraph=True)(x)
    return {"out": out, "schedule": be.schedule, "codes": codes}


def determinism_run(path=None):
    """test_vit (3 blocks) compiled with tomec, ToMe r=20, on two images (saved to ``path``)."""
    run = recorded_run(make_model("test_vit", depth=3), images("test_vit", 2), r=20)
    if path is not None:
        torch.save(run, path)
    return run


_DETERMINISM_CHILD = """
import sys
from tests.helpers import uninitialized_memory_poisoned
from tests.test_backend import determinism_run
with uninitialized_memory_poisoned():
    determinism_run(sys.argv[1])
"""


def test_deterministic_bitwise(tmp_path):
    """The same rewritten graph and the same logits, bit for bit, from a fresh process with another
    ``PYTHONHASHSEED`` and uninitialized memory poisoned.

    Calling one compiled model twice cannot fail on CPU (the same Python code on the same tensors,
    nothing races). The fresh process traces new FX nodes at other addresses under another string
    hash seed: a pass that walks a set of nodes or of names in iteration order can then rewrite the
    blocks in another order, pick other nodes or emit other ops. It also runs in torch's
    deterministic mode with uninitialized memory filled with NaN (integers: the largest value): an
    inserted op that reads memory it never wrote answers differently than here, and an op torch
    knows to be nondeterministic raises.
    """
    first = determinism_run()
    seed = os.environ.get("PYTHONHASHSEED", "")
    env = {**os.environ, "PYTHONHASHSEED": str(int(seed) + 1) if seed.isdigit() else "12345"}
    path = tmp_path / "run.pt"
    done = subprocess.run([sys.executable, "-c", _DETERMINISM_CHILD, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    child = torch.load(path)
    assert sum(first["schedule"]) == 20 and len(first["codes"]) == 1
    assert child["schedule"] == first["schedule"]
    assert child["codes"] == first["codes"]
    assert torch.equal(child["out"], first["out"])


@pytest.mark.slow
def test_inductor_deterministic_and_accepts_mode_and_options():
    """Two separate Inductor compiles in one mode give the same bits; ``mode=`` and ``options=``
    reach Inductor. (Calling one compiled model twice cannot fail on CPU: the same kernels run on
    the same tensors. The second compile traces new FX nodes, rewrites them again and compiles, or
    loads from Inductor's cache, what that rewrite hashes to: a rewrite that depends on node order
    or addresses changes the graph, and the kernels with it.)"""
    model = make_model("test_vit")
    x = images("test_vit", 4)
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        be = tomec.backend(r=40)
        compiled = torch.compile(model, backend=be, mode="reduce-overhead", options=None, fullgraph=True)
        with torch.no_grad():
            runs.append((compiled(x), be.schedule, be.report()))
    (a, schedule, report), (b, schedule2, report2) = runs
    assert torch.equal(a, b) and schedule == schedule2 and report == report2
    torch._dynamo.reset()
    be2 = tomec.backend(r=40)
    compiled2 = torch.compile(model, backend=be2, options={"epilogue_fusion": False}, fullgraph=True)
    with torch.no_grad():
        c = compiled2(x)
    assert relative_error(c, a) <= TOLERANCE
    assert be2.schedule == schedule


def test_registered_by_name_without_import():
    code = (
        "import torch, timm, sys\n"
        "assert 'tomec' not in sys.modules\n"
        "m = timm.create_model('test_vit', pretrained=False).eval()\n"
        "f = torch.compile(m, backend='tomec', options={'method': 'tome', 'r': 30, 'compiler': 'eager'})\n"
        "with torch.no_grad(): y = f(torch.randn(2, 3, 160, 160))\n"
        "assert 'tomec' in sys.modules and y.shape == (2, 1000)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_report_and_logging(caplog):
    model = make_model("test_vit")
    with caplog.at_level("INFO", logger="tomec"):
        compiled, be = compile_tomec(model, r=40, compiler="eager")
        with torch.no_grad():
            compiled(images("test_vit", 2))
    text = be.report()
    assert "block 0 (blocks.0): 101 -> " in text and "protected tokens: 1" in text
    assert sum("rewrote block" in r.getMessage() for r in caplog.records) == sum(v > 0 for v in be.schedule)


@pytest.mark.parametrize(
    "name,side,protected",
    [("deit_tiny_distilled_patch16_224", 224, 2), ("vit_small_patch14_reg4_dinov2", 112, 5)],
)
def test_protected_tokens_detected(name, side, protected):
    model = make_model(name, img_size=side)
    x = torch.randn(2, 3, side, side)
    compiled, be = compile_tomec(model, r=30, compiler="eager", trace_source=True)
    ref = reference_of(model, method="tome", r=30, trace_source=True)
    with torch.no_grad():
        out, expect = compiled(x), ref(x)
    assert be.protected == protected == reference.state(ref).protected
    assert relative_error(out, expect) <= TOLERANCE
    source = be.last_info["source"]
    assert torch.equal(source[:, :protected], torch.arange(protected).expand(2, protected))


@pytest.mark.parametrize(
    "name,kwargs,side,protected",
    [
        ("test_vit", dict(global_pool="avg", class_token=False), 160, 0),
        ("vit_little_patch16_reg4_gap_256", dict(img_size=128), 128, 4),  # mean over x[:, 4:]
    ],
)
def test_average_pooling_becomes_size_weighted(name, kwargs, side, protected):
    model = make_model(name, **kwargs)
    x = torch.randn(2, 3, side, side)
    compiled, be = compile_tomec(model, r=30, compiler="eager")
    ref = reference_of(model, method="tome", r=30)
    with torch.no_grad():
        out, expect = compiled(x), ref(x)
    assert be.protected == protected
    assert relative_error(out, expect) <= TOLERANCE
    assert "size-weighted mean" in be.report()


@pytest.mark.parametrize("impl", ["mask", "manual", "extra_dim", "flex"])
def test_proportional_attention_implementations_agree(impl):
    check_parity("test_vit", True, 4, True, compiler="eager", prop_attn_impl=impl)


def test_check_parity_keeps_backend_only_keywords_from_the_reference():
    """``impl=`` and ``strict=`` configure the compiled side only; ``protect=`` and method options
    reach the reference too (a reference without ``protect=2`` would protect only the CLS token,
    and both sides must resolve the same schedule and source maps)."""
    check_parity("test_vit", True, 2, compiler="eager", r=12, depth=2, impl="torch", strict=True, protect=2,
                 trace_source=True)
    check_parity("test_vit", True, 2, compiler="eager", r=12, depth=2, method="pitome", margin=0.1, bsm_first=False)


def test_dynamic_true_keeps_the_token_count_static_and_stays_correct():
    # timm checks the image size, so Dynamo specializes it: only the batch becomes symbolic
    model = make_model("test_vit")
    ref = reference_of(model, method="tome", r=40)
    torch._dynamo.reset()
    be = tomec.backend(r=40, compiler="eager")
    compiled = torch.compile(model, backend=be, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for batch in (2, 3):
            x = images("test_vit", batch, seed=batch)
            assert relative_error(compiled(x), ref(x)) <= TOLERANCE
    assert len(be.compile_seconds) == 1  # one graph serves both batch sizes
