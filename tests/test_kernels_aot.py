"""Every Triton kernel tomec launches compiles for real GPU targets (sm_80, sm_90, sm_100), no GPU needed.

The interpreter tests (tests/kernels/) check what the kernels compute; they run the kernels as Python
and accept code no GPU compiler does. Here Triton's ahead-of-time compiler builds a cubin of every
configuration the launchers produce over the shape grid of ``tomec.bench.aot`` (recorded from every
method's block step on meta tensors), and the check fails on a compile error, register spills at
DeiT-S/ViT-B/ViT-L shapes, or shared memory above the target's limit.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from tomec import kernels

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(kernels.unavailable_reason() is not None, reason="no Triton"),
]

if kernels.unavailable_reason() is None:
    import triton
    import triton.language as tl

    from tomec.bench import aot as bench_aot
    from tomec.kernels import aot

    _EPSILON = 1e-6  # a plain float: what the ToMe and PiToMe kernels once read

    @triton.jit
    def _reads_a_plain_global(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr) + _EPSILON)

    _FLOOR: tl.constexpr = tl.constexpr(1e-6)

    @triton.jit
    def _reads_a_constexpr_global(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr) + _FLOOR)

    @triton.jit
    def _divides_fp64(x_ptr, y_ptr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, offs = tl.arange(0, ROWS), tl.arange(0, BLOCK)
        x = tl.load(x_ptr + rows[:, None] * BLOCK + offs[None, :])
        tl.store(x_ptr + rows[:, None] * BLOCK + offs[None, :], x / tl.load(y_ptr + rows)[:, None])

    @triton.jit
    def _holds_too_much(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs)
        tl.store(x_ptr + offs, a * tl.sum(a))  # every value stays live until the sum is known

def _declared_kernels() -> set[str]:
    """Every jit kernel of the kernel modules that declares a cost (the launched ones)."""
    from triton.runtime.jit import JITFunction

    names = set()
    for module in kernels.MODULES:
        mod = importlib.import_module(f"tomec.kernels.{module}")
        for value in vars(mod).values():
            if isinstance(value, JITFunction) and value.launch_metadata is not None:
                names.add(value.__name__)
    return names


# The models whose shapes each target compiles here, one compile per kernel configuration (CI's time:
# about 1 s per compile on its CPUs): sm_90, the H100/H200 the launchers size their grids for, the
# whole grid; sm_80 and sm_100 the shapes the spill rule covers. `python -m tomec.bench.aot` compiles
# the whole grid for every target, and for sm_90 each divisibility variant of the integer arguments
# too (bench/results/kernels-aot.json, checked below to list the same kernels).
TARGET_MODELS = {80: bench_aot.NO_SPILL_MODELS, 90: tuple(bench_aot.MODELS), 100: bench_aot.NO_SPILL_MODELS}


@pytest.mark.parametrize("cc", sorted(TARGET_MODELS))
def test_every_kernel_compiles_for_the_target(cc):
    grid = bench_aot.shapes(TARGET_MODELS[cc]) + [bench_aot.FP64_SHAPE]
    rows = bench_aot.compile_all(cc, grid, with_attrs=False)
    assert bench_aot.failures(rows) == []
    assert all(r.registers > 0 for r in rows)
    assert {r.kernel for r in rows} == _declared_kernels()  # every kernel is launched by some method
    # the committed table (README's kernel section) lists the same kernels for this target
    committed = json.loads((bench_aot.RESULTS / "kernels-aot.json").read_text())
    listed = {e["kernel"] for e in committed["summary"] if e["target"] == f"sm_{cc}"}
    assert listed == {r.kernel for r in rows}, "bench/results/kernels-aot.json is stale: python -m tomec.bench.aot"


def _one_launch(kernel, *args, **kwargs):
    return aot.Launch(kernel, (1,), args, kwargs)


def test_a_plain_float_global_is_a_compile_error():
    """What the interpreter let through (kernels/match.py's TINY before it became a constexpr)."""
    x = torch.empty(1, device="meta")
    broken = aot.compile_for(aot.specialize(_one_launch(_reads_a_plain_global, x), 90), 90)
    assert broken.error is not None and "Cannot access global variable _EPSILON" in broken.error
    fixed = aot.compile_for(aot.specialize(_one_launch(_reads_a_constexpr_global, x), 90), 90)
    assert fixed.error is None and fixed.registers > 0


def test_limits_are_checked(monkeypatch):
    x = torch.empty(8192, device="meta")
    spilling = aot.compile_for(aot.specialize(_one_launch(_holds_too_much, x, BLOCK=8192, num_warps=1), 90), 90)
    assert spilling.error is None and spilling.spills  # 8192 fp32 values live in 32 threads
    shared = _one_launch(_holds_too_much, x, BLOCK=1024, num_warps=4)  # the sum goes through shared memory
    assert aot.compile_for(aot.specialize(shared, 90), 90).problems == []
    monkeypatch.setitem(aot.SHARED_LIMIT, 90, 0)
    assert any("shared memory" in p for p in aot.compile_for(aot.specialize(shared, 90), 90).problems)


def test_a_call_frame_is_not_a_spill():
    """fp64 division calls a slow-path routine with a stack frame: ptxas reports no spill, and
    neither does the check (the fp64 merge kernel has such a frame)."""
    x = torch.empty(8 * 128, device="meta", dtype=torch.float64)
    launch = _one_launch(_divides_fp64, x, x, ROWS=8, BLOCK=128, num_warps=1)
    divides = aot.compile_for(aot.specialize(launch, 90), 90)
    assert divides.error is None and divides.stack > 0
    assert divides.spill_stores == 0 and not divides.spills


def test_the_spill_rule_names_the_models(monkeypatch):
    """A spilling configuration that serves DeiT-S/ViT-B/ViT-L shapes is a failure; elsewhere it is
    recorded only."""
    grid = bench_aot.shapes(("deit_ti", "deit_s"), (197,), (1,), (torch.float16,))
    real = aot.compile_for

    def spilling(spec, cc):
        result = real(spec, cc)
        if spec.name == "_merge_kernel":
            result.spill_stores = result.spill_loads = 64
        return result

    monkeypatch.setattr(aot, "compile_for", spilling)
    rows = bench_aot.compile_all(90, grid, method_names=["tome"])
    lines = bench_aot.failures(rows)
    assert lines and all("_merge_kernel" in line and "deit_s" in line for line in lines)
    only_tiny = bench_aot.compile_all(90, bench_aot.shapes(("deit_ti",), (197,), (1,), (torch.float16,)),
                                      method_names=["tome"])
    assert bench_aot.failures(only_tiny) == [] and any(r.spills for r in only_tiny)


def test_the_kernels_inductor_generates_for_a_merged_cuda_graph_compile():
    """Inductor's own kernels for a merged fp16 model on (fake) CUDA, and tomec's as Inductor
    re-emits them, compiled for sm_90 (bench/inductor_aot.py says what differs from a real GPU)."""
    summary = bench_aot.inductor_summary(90)
    assert summary["failures"] == []
    ours = set(summary["tomec_kernels"])
    assert {"_merge_kernel", "_dest_csr_kernel", "_compose_source_kernel"} <= ours
    assert summary["kernels"] - len(ours) > 20  # norms, residual adds, GELU, softmax ...
