"""GPU tests: kernel parity in fp32/fp16/bf16, model parity, CUDA graphs. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import tomec
from tests.helpers import compile_tomec, images, make_model, random_map, reference_of, relative_error
from tomec import kernels, ops, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.unavailable_reason() is not None,
    reason="needs a CUDA GPU and Triton",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,protected", [(197, 64, 1), (198, 80, 5), (577, 64, 1), (1025, 64, 1)])
def test_match_kernel_gpu(n, d, protected, dtype):
    g = torch.Generator().manual_seed(n)
    metric = torch.randint(-3, 4, (8, n, d), generator=g).to("cuda", dtype)  # exact scores, ties
    for r in (0, 1, (n - protected) // 4, (n - protected) // 2):
        fast = ops.bipartite_match(metric, r, protected, impl="triton")
        assert torch.equal(fast, ops.bipartite_match(metric, r, protected, impl="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("n,protected", [(197, 1), (577, 1)])
def test_pitome_kernel_gpu(n, protected, bsm, dtype):
    g = torch.Generator().manual_seed(n)
    keys = torch.zeros(8, 1, n, 64)
    for b in range(8):  # exact cosines, exact energies with margin 0: ties decided identically
        for i in range(n):
            keys[b, 0, i, torch.randperm(16, generator=g)[:4]] = 1.0
    keys = keys.to("cuda", dtype)
    for r in (1, (n - protected) // 4, (n - protected) // 2):
        fast = ops.pitome_match(keys, r, protected, margin=0.0, bsm=bsm, impl="triton")
        assert torch.equal(fast, ops.pitome_match(keys, r, protected, margin=0.0, bsm=bsm))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mean", "norm_preserving"])
@pytest.mark.parametrize("n,n_out,n_dropped,channels", [(197, 150, 0, 384), (577, 300, 30, 768), (1025, 512, 0, 1024)])
def test_merge_kernel_gpu(n, n_out, n_dropped, channels, dtype, mode):
    x64 = torch.randn(8, n, channels, dtype=torch.float64, device="cuda")
    size64 = torch.randint(1, 6, (8, n, 1), device="cuda").double()
    dest = random_map(8, n, n_out, n_dropped, seed=n).cuda()
    exact, size_exact = ops.merge(x64, size64, dest, n_out, n_dropped=n_dropped, mode=mode)
    plain, _ = ops.merge(x64.to(dtype), size64.to(dtype), dest, n_out, n_dropped=n_dropped, mode=mode)
    fast, size_fast = ops.merge(x64.to(dtype), size64.to(dtype), dest, n_out, mode=mode, impl="triton")
    err_fast = (fast.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert err_fast <= 2 * err_plain + FLOOR[dtype] * exact.abs().max().item()
    assert torch.equal(size_fast.double(), size_exact)
    again, _ = ops.merge(x64.to(dtype), size64.to(dtype), dest, n_out, mode=mode, impl="triton")
    assert torch.equal(fast, again)  # deterministic


@pytest.mark.parametrize("method", tomec.methods.available())
@pytest.mark.parametrize("name", ["test_vit", "deit_tiny_patch16_224"])
@pytest.mark.parametrize("fused", [True, False])
def test_model_parity_gpu_fp32(name, fused, method):
    model = make_model(name, fused).cuda()
    x = images(name, 4).cuda()
    r = 40 if name == "test_vit" else 80
    compiled, be = compile_tomec(model, method=method, r=r)
    ref = reference_of(model, method=method, r=r)
    with torch.no_grad():
        out, expect = compiled(x), ref(x)
    assert be.schedule == reference.state(ref).schedule
    assert relative_error(out, expect) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_low_precision_follows_the_rule(dtype):
    model = make_model("deit_tiny_patch16_224").cuda()
    x = images("deit_tiny_patch16_224", 8).cuda()
    ref32 = reference_of(model, method="tome", r=80)
    ref_low = reference_of(model, method="tome", r=80).to(dtype)
    compiled, _ = compile_tomec(model.to(dtype), r=80)
    with torch.no_grad():
        exact = ref32(x).double()
        plain = ref_low(x.to(dtype)).double()
        fast = compiled(x.to(dtype)).double()
    err_fast, err_plain = (fast - exact).abs().max(), (plain - exact).abs().max()
    assert err_fast <= 2 * err_plain + FLOOR[dtype] * exact.abs().max()


def test_reduce_overhead_captures_the_whole_model():
    from torch._dynamo.utils import counters

    counters.clear()
    model = make_model("deit_tiny_patch16_224").cuda().half()
    x = images("deit_tiny_patch16_224", 16).cuda().half()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=tomec.backend(r=80), mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        outs = [compiled(x).clone() for _ in range(4)]
    assert counters["inductor"]["cudagraph_skips"] == 0
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("method", ["tome", "tofu", "pitome"])
def test_training_step_gpu(method):
    """Forward and backward compiled by AOTAutograd + Inductor through the Triton merge's backward:
    the gradients equal the eager reference's."""
    model = make_model("test_vit").cuda().train()
    x = images("test_vit", 4).cuda()
    ref = reference_of(model, method=method, r=40).train()
    compiled, _ = compile_tomec(model, method=method, r=40)
    grads = []
    for run, params in ((compiled, model), (ref, ref)):
        params.zero_grad(set_to_none=True)
        run(x).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in params.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        expect = grads[1][name]
        assert (grad - expect).abs().max() <= 1e-3 * expect.abs().max() + 1e-6, name


@pytest.mark.parametrize("impl", ["mask", "manual", "extra_dim", "flex"])
def test_prop_attn_impls_bf16_follow_the_rule(impl):
    """Each way of giving SDPA log(size), in bf16, against the manual form in fp64: at most twice the
    error of the manual form in bf16 (the rule), and never NaN (cuDNN and an fp32 mask, reported)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 6, 150, 64, device="cuda", generator=g) for _ in range(3))
    size = torch.randint(1, 6, (4, 150, 1), device="cuda", generator=g).float()
    exact = ops.attention(q.double(), k.double(), v.double(), ops.log_size_bias(size.double(), torch.float64))
    low = [t.bfloat16() for t in (q, k, v)]
    bias = ops.log_size_bias(size, torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias.shape == (4, 1, 1, 150)
    plain = ops.attention(*low, bias)
    forms = {
        "mask": lambda: torch.nn.functional.scaled_dot_product_attention(*low, attn_mask=bias),
        "manual": lambda: ops.attention(*low, bias),
        "extra_dim": lambda: ops.attention_extra_dim(*low, bias),
        "flex": lambda: torch.compile(ops.attention_flex)(*low, bias),
    }
    out = forms[impl]()
    assert not out.isnan().any()
    err, err_plain = (out.double() - exact).abs().max(), (plain.double() - exact).abs().max()
    assert err <= 2 * err_plain + FLOOR[torch.bfloat16] * exact.abs().max()


def test_sdpa_mask_on_every_backend_bf16():
    """The [B, 1, 1, N] bf16 mask on each SDPA backend that accepts it (cuDNN included)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(8, 12, 197, 64, device="cuda", generator=g).bfloat16() for _ in range(3))
    bias = ops.log_size_bias(torch.randint(1, 4, (8, 197, 1), device="cuda", generator=g).float(), q.dtype)
    expect = ops.attention(q.double(), k.double(), v.double(), bias.double())
    tried = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        except RuntimeError:  # this backend does not take such a mask here
            continue
        tried.append(backend)
        assert not out.isnan().any(), backend
        assert (out.double() - expect).abs().max() <= 2e-2 * expect.abs().max(), backend
    assert SDPBackend.MATH in tried


@pytest.mark.parametrize("impl", ["mask", "manual", "extra_dim", "flex"])
def test_model_prop_attn_impls_bf16(impl):
    model = make_model("deit_tiny_patch16_224").cuda()
    x = images("deit_tiny_patch16_224", 8).cuda()
    ref32 = reference_of(model, method="tome", r=80)
    ref_low = reference_of(model, method="tome", r=80).to(torch.bfloat16)
    compiled, _ = compile_tomec(model.to(torch.bfloat16), r=80, prop_attn_impl=impl)
    with torch.no_grad():
        exact, plain = ref32(x).double(), ref_low(x.bfloat16()).double()
        fast = compiled(x.bfloat16()).double()
    assert not fast.isnan().any()
    err_fast, err_plain = (fast - exact).abs().max(), (plain - exact).abs().max()
    assert err_fast <= 2 * err_plain + FLOOR[torch.bfloat16] * exact.abs().max()


@pytest.mark.parametrize("method", [m for m in tomec.methods.available() if m != "dct"])
def test_every_kernel_compiles_on_this_gpu(method):
    """The device's own compiler (JITFunction.warmup) on every launch of the method's block steps at
    DeiT-S and ViT-L shapes, bf16 and fp32: what tests/test_kernels_aot.py checks ahead of time."""
    from tomec.bench.aot import Shape, step_launches
    from tomec.kernel_check import compile_on_device

    for shape in (Shape("deit_s", 384, 6, 197, 2, torch.bfloat16), Shape("vit_l", 1024, 16, 577, 1, torch.float32)):
        for launches in step_launches(method, shape):
            for launch in launches:
                assert compile_on_device(launch, torch.device("cuda")) is None, (launch.name, shape)


def test_the_backend_checks_kernels_and_nothing_falls_back():
    from tomec.ops.common import broken_ops

    model = make_model("deit_tiny_patch16_224").cuda().half()
    compiled, _ = compile_tomec(model, method="pitome", r=80, trace_source=True)
    with torch.no_grad():
        compiled(images("deit_tiny_patch16_224", 2).cuda().half())
    assert broken_ops() == {}


@pytest.mark.parametrize("dtype", DTYPES)
def test_atc_kernel_gpu(dtype):
    g = torch.Generator().manual_seed(3)
    metric = torch.randint(-3, 4, (4, 197, 64), generator=g).to("cuda", dtype)
    for r in (1, 40, 150):
        fast = ops.atc_match(metric, r, 1, impl="triton")
        assert torch.equal(fast, ops.atc_match(metric, r, 1, impl="torch"))


@pytest.mark.parametrize("n", [197, 577])
def test_crossget_kernel_gpu(n):
    g = torch.Generator().manual_seed(n)
    keys = torch.randint(-3, 4, (4, 6, n, 64), generator=g).float().cuda()
    q = torch.randn(4, 6, n, 64, generator=g).cuda()
    for r in (1, n // 4):
        fast = ops.crossget_match(keys, q, r, 1, impl="triton")
        slow = ops.crossget_match(keys, q, r, 1, impl="torch")
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [197, 577])
def test_attention_received_kernel_gpu(n, dtype):
    g = torch.Generator().manual_seed(n)
    q, k = (torch.randn(4, 12, n, 64, generator=g).cuda() for _ in range(2))
    size = torch.randint(1, 6, (4, n, 1), generator=g).float().cuda()
    exact = ops.attention_received(q.double(), k.double(), size.double())
    plain = ops.attention_received(q.to(dtype), k.to(dtype), size.to(dtype))
    fast = ops.attention_received(q.to(dtype), k.to(dtype), size.to(dtype), impl="triton")
    err_fast, err_plain = (fast.double() - exact).abs().max(), (plain.double() - exact).abs().max()
    assert err_fast <= 2 * err_plain + FLOOR[dtype] * exact.abs().max()
    again = ops.attention_received(q.to(dtype), k.to(dtype), size.to(dtype), impl="triton")
    assert torch.equal(fast, again)
