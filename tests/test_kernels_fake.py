"""The Triton ops' fake functions on fake CUDA tensors, and which ops the pass inserts per device.

No GPU needed: FakeTensorMode creates ``device="cuda"`` tensors on any machine.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import tomec
from tests.helpers import images, make_model, trace
from tomec.bench.inductor_aot import as_fake_cuda
from tomec import kernels, ops
from tomec.config import TomecConfig
from tomec.passes import rewrite

pytestmark = pytest.mark.skipif(kernels.unavailable_reason() is not None, reason="no Triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_functions_on_cuda(dtype):
    kernels.load()
    with FakeTensorMode():
        metric = torch.empty(4, 197, 64, device="cuda", dtype=dtype)
        dest = torch.ops.tomec.bipartite_match(metric, 20, 1)
        assert (dest.shape, dest.dtype, dest.device.type) == ((4, 197), torch.int64, "cuda")
        x = torch.empty(4, 197, 384, device="cuda", dtype=dtype)
        size = torch.empty(4, 197, 1, device="cuda", dtype=dtype)
        for mode in ("mean", "norm_preserving"):
            out, size_out = torch.ops.tomec.merge(x, size, dest, 177, None, mode)
            assert (out.shape, out.dtype, out.device.type) == ((4, 177, 384), dtype, "cuda")
            assert (size_out.shape, size_out.dtype) == ((4, 177, 1), dtype)
        for bsm in (True, False):
            pitome = torch.ops.tomec.pitome_match(metric, 20, 1, 0.5, bsm)
            assert (pitome.shape, pitome.dtype, pitome.device.type) == ((4, 197), torch.int64, "cuda")
        source = torch.ops.tomec.compose_source(dest, dest)
        assert (source.shape, source.dtype) == ((4, 197), torch.int64)
        labels = torch.ops.tomec.atc_cluster_triton(torch.empty(4, 196, 196, device="cuda", dtype=dtype), 20, "average")
        assert (labels.shape, labels.dtype, labels.device.type) == ((4, 196), torch.int64, "cuda")
        # and through the op layer, as the passes call it
        assert ops.bipartite_match(metric, 20, 1, impl="triton").shape == (4, 197)
        assert ops.atc_match(metric, 20, 1, impl="triton").shape == (4, 197)
        assert ops.merge(x, None, dest, 177, impl="auto")[0].shape == (4, 177, 384)


def _inserted(gm):
    """The ``impl`` of every inserted merge step."""
    return {n.kwargs["impl"] for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "merge_step"}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_pass_inserts_triton_ops_on_cuda_and_torch_ops_on_cpu(device):
    gm, inputs = trace(make_model("test_vit"), images("test_vit", 2))
    config = TomecConfig(r=30, trace_source=True, compiler="eager")
    if device == "cuda":
        inputs, mode = as_fake_cuda(gm, inputs)
    result = rewrite(gm, inputs, config)
    impl = "auto" if device == "cuda" else "torch"  # "auto": each op's kernel, unless it failed to compile
    assert _inserted(result.gm) == {impl}
    # what Inductor would receive: the ATen-level graph holds the tomec Triton ops only on CUDA
    if device == "cuda":
        with mode:
            aten = make_fx(result.gm)(*inputs)
    else:
        aten = make_fx(result.gm)(*inputs)
    targets = {str(n.target) for n in aten.graph.nodes if n.op == "call_function"}
    tomec_ops = {t for t in targets if "tomec" in t or "triton_kernel_wrapper" in t}
    if device == "cuda":
        assert {"tomec.bipartite_match.default", "tomec.merge.default", "tomec.compose_source.default"} <= tomec_ops
    else:
        assert tomec_ops == set()
    # proportional attention on CUDA keeps SDPA with the log(size) mask ("auto" -> "mask")
    sdpa = [n for n in result.gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    if device == "cuda":
        assert len(sdpa) == 6 and sum(n.kwargs.get("attn_mask") is not None for n in sdpa) == 5
    else:
        assert len(sdpa) == 1  # the five merged layers use the explicit chain on CPU


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops.common, "_warned_fallback", False)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "Triton cannot be imported (test)")
    with pytest.warns(UserWarning, match="Triton cannot be imported"):
        assert ops.resolve_impl("auto", torch.device("cuda")) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_impl("auto", torch.device("cuda")) == "torch"  # no second warning
    with pytest.raises(tomec.ConfigError, match="not available"):
        ops.resolve_impl("triton", torch.device("cuda"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(tomec.ConfigError, match="TRITON_INTERPRET=1"):
        ops.bipartite_match(torch.randn(1, 9, 8), 2, 1, impl="triton")


@pytest.mark.parametrize("method,op", [("pitome", "tomec.pitome_match.default"), ("tofu", "tomec.merge.default")])
def test_other_methods_reach_their_kernels_on_cuda(method, op):
    gm, inputs = trace(make_model("test_vit"), images("test_vit", 2))
    inputs, mode = as_fake_cuda(gm, inputs)
    result = rewrite(gm, inputs, TomecConfig(method=method, r=30, compiler="eager"))
    with mode:
        aten = make_fx(result.gm)(*inputs)
    assert op in {str(n.target) for n in aten.graph.nodes if n.op == "call_function"}


def test_ltmp_block_removing_nothing_gets_its_reorder_on_cuda():
    # a block with zero counts still permutes the tokens A then B: one merge op per block
    gm, inputs = trace(make_model("test_vit", depth=3), images("test_vit", 2))
    inputs, mode = as_fake_cuda(gm, inputs)
    counts = {"merge": [0, 6, 3], "prune": [0, 2, 0]}
    config = TomecConfig(method="ltmp", compiler="eager", method_options={"counts": counts})
    result = rewrite(gm, inputs, config)
    with mode:
        aten = make_fx(result.gm)(*inputs)
    targets = [str(n.target) for n in aten.graph.nodes if n.op == "call_function"]
    assert targets.count("tomec.merge.default") == 3
    assert result.report.blocks[0].endswith("reordered A then B (r=0)")


def test_mctf_one_step_ahead_on_cuda_replaces_the_merged_blocks_attention():
    gm, inputs = trace(make_model("test_vit"), images("test_vit", 2))
    inputs, mode = as_fake_cuda(gm, inputs)
    result = rewrite(gm, inputs, TomecConfig(method="mctf", r=30, compiler="eager"))
    targets = _aten_targets(result.gm, inputs, mode)
    assert {"tomec.attention_received.default", "tomec.merge.default"} <= targets
    sdpa = [n for n in result.gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 1  # block 0's; blocks 1-5 apply their merged one-step-ahead maps


@pytest.fixture
def fresh_kernel_checks(monkeypatch):
    """No op marked broken and no compile cached by an earlier test."""
    from tomec import kernel_check

    monkeypatch.setattr(ops.common, "_broken_ops", {})
    monkeypatch.setattr(kernel_check, "_checked", {})
    return kernel_check


def _aten_targets(gm, inputs, mode):
    with mode:
        aten = make_fx(gm)(*inputs)
    return {str(n.target) for n in aten.graph.nodes if n.op == "call_function"}


def _cuda_graph(config):
    gm, inputs = trace(make_model("test_vit"), images("test_vit", 2))
    inputs, mode = as_fake_cuda(gm, inputs)
    return rewrite(gm, inputs, config).gm, inputs, mode


def test_a_kernel_that_does_not_compile_falls_back_to_its_plain_op(fresh_kernel_checks):
    kernel_check = fresh_kernel_checks
    seen = []

    def compile_launch(launch, device):  # the matching kernel fails for this device, the rest compile
        seen.append((launch.name, launch.op))
        return "CompilationError: made to fail" if launch.op == "bipartite_match" else None

    config = TomecConfig(r=30, trace_source=True, compiler="eager")
    gm, inputs, mode = _cuda_graph(config)
    with pytest.warns(UserWarning, match=r"bipartite_match.*does not compile.*made to fail.*plain-PyTorch"):
        failed = kernel_check.check_graph(gm, "auto", compile_launch)
    assert set(failed) == {"bipartite_match"}
    assert {op for _, op in seen} == {"bipartite_match", "merge", "compose_source"}
    targets = _aten_targets(gm, inputs, mode)
    assert "tomec.bipartite_match.default" not in targets  # the plain PyTorch matching instead
    assert {"tomec.merge.default", "tomec.compose_source.default"} <= targets
    # a second graph of the same shapes: every configuration from the cache, no second warning
    gm2, _, _ = _cuda_graph(config)
    compiled = len(seen)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel_check.check_graph(gm2, "auto", compile_launch)
    assert len(seen) == compiled


def test_impl_triton_raises_the_compile_error(fresh_kernel_checks):
    kernel_check = fresh_kernel_checks
    gm, _, _ = _cuda_graph(TomecConfig(r=30, compiler="eager", impl="triton"))
    fail = lambda launch, device: "PTXASError: made to fail" if launch.name == "_merge_kernel" else None  # noqa: E731
    with pytest.raises(tomec.KernelCompileError, match=r"_merge_kernel \(torch.ops.tomec.merge\).*made to fail"):
        kernel_check.check_graph(gm, "triton", fail)


def test_backend_checks_cuda_graphs_before_compiling(fresh_kernel_checks, monkeypatch):
    """Through the backend: the check runs on a CUDA graph, and the fallback reaches the graph."""
    kernel_check = fresh_kernel_checks
    calls = []

    def compile_on_device(launch, device):
        calls.append(launch.op)
        return "CompilationError: made to fail" if launch.op == "bipartite_match" else None

    monkeypatch.setattr(kernel_check, "compile_on_device", compile_on_device)
    gm, inputs = trace(make_model("test_vit"), images("test_vit", 2))
    inputs, mode = as_fake_cuda(gm, inputs)
    be = tomec.backend(r=30, compiler="eager")
    with pytest.warns(UserWarning, match="does not compile"):
        be(gm, inputs)
    assert "bipartite_match" in calls and ops.common.broken_ops().keys() == {"bipartite_match"}
    assert ops.resolve_impl("auto", torch.device("cuda"), "bipartite_match") == "torch"
    assert ops.resolve_impl("auto", torch.device("cuda"), "merge") == "triton"
    # CPU graphs are not checked
    calls.clear()
    gm, inputs = trace(make_model("test_vit"), images("test_vit", 2))
    tomec.backend(r=30, compiler="eager")(gm, inputs)
    assert calls == []


def test_impl_triton_on_a_cpu_graph_is_an_error():
    gm, inputs = trace(make_model("test_vit"), images("test_vit", 2))
    with pytest.raises(tomec.ConfigError, match="impl='triton'.*CUDA tensors.*cpu"):
        rewrite(gm, inputs, TomecConfig(r=30, compiler="eager", impl="triton"))


@pytest.mark.slow
def test_kernel_check_compiles_every_kernel_of_a_graph_for_sm90(fresh_kernel_checks):
    """The check with Triton's real compiler (ahead of time for sm_90, as tests/test_kernels_aot.py):
    every kernel of a ToMe graph with source tracing compiles; nothing falls back."""
    from tomec.kernels import aot

    kernel_check = fresh_kernel_checks
    compiled = []

    def compile_launch(launch, device):
        result = aot.compile_for(aot.specialize(launch, 90), 90)
        compiled.append(result)
        return result.error or (result.problems[0] if result.problems else None)

    gm, _, _ = _cuda_graph(TomecConfig(method="pitome", r=30, trace_source=True, compiler="eager"))
    assert kernel_check.check_graph(gm, "auto", compile_launch) == {}
    assert compiled and all(c.registers > 0 for c in compiled)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_sdpa_masks_are_in_the_query_dtype_and_shape(dtype, method):
    """cuDNN's SDPA (preferred on sm_90) has been reported to misread an fp32 additive mask beside
    fp16/bf16 queries: every mask tomec gives SDPA on CUDA is [B, 1, 1, N] in the query's dtype."""
    model = make_model("test_vit").to(dtype)
    gm, inputs = trace(model, images("test_vit", 2).to(dtype))
    inputs, _ = as_fake_cuda(gm, inputs)
    # MCTF after the attention residual (one step ahead its merging blocks run no SDPA at all)
    options = {"one_step_ahead": False} if method == "mctf" else {}
    result = rewrite(gm, inputs, TomecConfig(method=method, r=30, compiler="eager", method_options=options))
    masked = [n for n in result.gm.graph.nodes
              if "scaled_dot_product" in str(n.target) and n.kwargs.get("attn_mask") is not None]
    assert len(masked) == 5  # every block after the first merge
    for node in masked:
        q = node.args[0].meta["val"]
        mask = node.kwargs["attn_mask"].meta["val"]
        assert mask.dtype == q.dtype == dtype and mask.device.type == "cuda"
        assert mask.shape == (q.shape[0], 1, 1, node.args[1].meta["val"].shape[2])
