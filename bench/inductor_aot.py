"""The kernels Inductor generates for a merged model on CUDA, compiled for a GPU target without a GPU.

tomec's own kernels are compiled ahead of time by ``tomec.bench.aot``; this does the same for what
Inductor makes of a whole rewritten graph (its fused pointwise and reduction kernels, and tomec's
kernels as Inductor re-emits them). The graph is rewritten on fake CUDA tensors, then Inductor
compiles it with the CUDA device faked (device properties of an H100/H200, Triton's driver answering
with the chosen target) and stops after code generation; every ``async_compile.triton`` kernel of the
generated module is loaded and each of its autotuning configurations compiled with Inductor's own
``CachingAutotuner._precompile_config(cfg, cc_override=cc)``, then read with ``cuobjdump``.

What differs from a real GPU, and why: (1) SDPA's backend is chosen when the graph is traced, from
the device (``torch._fused_sdp_choice``); without one it is the math form, so the attention here is
Inductor's decomposition (softmax kernels) where a GPU would call the fused flash/efficient kernel;
(2) Inductor's pattern-matcher passes and joint-graph constant folding are off, because they run ops
on real CUDA tensors while compiling. Inductor internals of torch 2.14 are patched to fake the device:
this runs in CI's environment, not on the lent GPU (which compiles for real).

    python -m tomec.bench.inductor_aot        # prints the table; tests/test_kernels_aot.py checks it
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from unittest import mock

import torch

from tomec import kernels
from tomec.config import TomecConfig
from tomec.kernels import aot
from tomec.passes import rewrite


@dataclass
class FakeProperties:
    """What Inductor reads of ``torch.cuda.get_device_properties`` (an H100/H200-class GPU)."""

    name: str = "NVIDIA H100/H200 (faked for an ahead-of-time compile)"
    major: int = 9
    minor: int = 0
    multi_processor_count: int = 132
    regs_per_multiprocessor: int = 65536
    max_threads_per_multi_processor: int = 2048
    max_threads_per_block: int = 1024
    warp_size: int = 32
    total_memory: int = 141 * 2**30
    shared_memory_per_block_optin: int = 232448
    shared_memory_per_multiprocessor: int = 233472
    L2_cache_size: int = 50 * 2**20
    gcnArchName: str = ""
    is_integrated: bool = False


class _FakeDriver:
    """Triton's active driver, answering with a fixed target and no device."""

    def __init__(self, cc: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cc, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda", 0)

    def get_device_interface(self):
        return torch.cuda

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def fake_gpu(cc: int = 90) -> Iterator[None]:
    """Inductor and Triton believe a compute-capability ``cc`` GPU is present (nothing runs on it)."""
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor.runtime import triton_helpers
    from triton.runtime.driver import driver

    props = FakeProperties(major=cc // 10, minor=cc % 10)
    fake = _FakeDriver(cc)
    static = staticmethod
    patches = [
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.device_count", lambda: 1),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda.get_device_properties", lambda *a, **k: props),
        mock.patch("torch.cuda.get_device_capability", lambda *a, **k: (props.major, props.minor)),
        mock.patch("torch.cuda.get_device_name", lambda *a, **k: props.name),
        mock.patch("torch.cuda.get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
        mock.patch("torch.cuda.set_rng_state", lambda *a, **k: None),
        mock.patch("torch.cuda._exchange_device", lambda idx: 0),
        mock.patch("torch.cuda._maybe_exchange_device", lambda idx: 0),
        mock.patch("torch._inductor.scheduler.has_triton", lambda: True),
        mock.patch("torch._inductor.fx_passes.joint_graph.lazy_init", lambda *a, **k: None),
        mock.patch.object(CudaInterface, "get_device_properties", static(lambda *a, **k: props)),
        mock.patch.object(CudaInterface, "current_device", static(lambda: 0)),
        mock.patch.object(CudaInterface, "device_count", static(lambda: 1)),
        mock.patch.object(CudaInterface, "exchange_device", static(lambda idx: 0)),
        mock.patch.object(CudaInterface, "maybe_exchange_device", static(lambda idx: 0)),
        mock.patch.object(CudaInterface, "is_bf16_supported", static(lambda *a, **k: True)),
        mock.patch.object(CudaInterface, "is_triton_capable", static(lambda *a, **k: True)),
        mock.patch.object(CudaInterface, "get_compute_capability", static(lambda *a, **k: cc)),
        mock.patch.object(triton_helpers, "set_driver_to_gpu", lambda: driver.set_active(fake)),
        mock.patch("torch._inductor.config.compile_threads", 1),
        mock.patch("torch._inductor.config.pattern_matcher", False),
        mock.patch("torch._inductor.config.joint_graph_constant_folding", False),
    ]
    previous = driver._active
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        driver.set_active(fake)
        try:
            yield
        finally:
            driver._active = previous


class _Stop(Exception):
    """Raised once Inductor has generated the module's code: nothing is loaded or run."""


def generated_code(gm: torch.fx.GraphModule, inputs: Sequence[Any], mode: Any, cc: int = 90) -> str:
    """The Python module Inductor generates for ``gm`` on a fake ``cc`` GPU (``inputs``: fake CUDA
    tensors of ``mode``)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.graph import GraphLowering

    code: list[str] = []

    def stop_after_codegen(self):
        generated = self.codegen()
        source = generated[0] if isinstance(generated, tuple) else generated
        code.append(source if isinstance(source, str) else getattr(source, "value", str(source)))
        raise _Stop

    with fake_gpu(cc), mock.patch.object(GraphLowering, "compile_to_module", stop_after_codegen), mode:
        try:
            compile_fx(gm, list(inputs))
        except Exception as e:  # Inductor wraps _Stop in its own errors
            if not code:
                raise
            del e
    return code[0]


_KERNEL = re.compile(r"async_compile\.triton\('([^']+)', '''(.*?)''', device_str='cuda'\)", re.S)


@dataclass
class InductorRow:
    kernel: str
    config: str
    target: str
    registers: int
    stack: int
    local: int
    shared: int
    tomec: bool  # one of tomec's kernels, re-emitted by Inductor
    error: Optional[str] = None
    spill_stores: Optional[int] = None  # ptxas's report, bytes per thread
    spill_loads: Optional[int] = None

    @property
    def spills(self) -> bool:
        return aot.spills(self.spill_stores, self.spill_loads, self.stack, self.local)


def compile_generated(code: str, cc: int = 90) -> list[InductorRow]:
    """Compile every autotuning configuration of every Triton kernel in Inductor's ``code`` for ``cc``."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    ours = _tomec_kernel_names()
    rows = []
    kernels.load()
    with tempfile.TemporaryDirectory(prefix="tomec-inductor-aot-") as tmp, fake_gpu(cc):
        for i, (name, source) in enumerate(_KERNEL.findall(code)):
            path = Path(tmp) / f"kernel_{i}.py"  # Triton reads a jit function's source from its file
            path.write_text(source)
            spec = importlib.util.spec_from_file_location(f"tomec_inductor_aot_{i}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            (tuner,) = [v for v in vars(module).values() if isinstance(v, CachingAutotuner)]
            for cfg in tuner.configs:
                row = InductorRow(name, str(cfg), f"sm_{cc}", 0, 0, 0, 0, name in ours)
                log = io.StringIO()
                try:
                    with aot.ptxas_report(log):
                        binary = tuner._precompile_config(cfg, cc_override=cc).kernel
                except Exception as e:  # reported as the row's error
                    row.error = f"{type(e).__name__}: {aot.error_summary(str(e))}"
                    rows.append(row)
                    continue
                cubin = getattr(binary, "cubin_raw", None) or binary.asm["cubin"]
                row.registers, row.stack, static_shared, row.local = aot.cubin_resources(cubin)
                row.spill_stores, row.spill_loads = aot.spill_bytes(log.getvalue())
                dynamic = getattr(binary, "shared", None)
                if dynamic is None:
                    dynamic = binary.metadata.shared
                row.shared = int(dynamic) + static_shared
                rows.append(row)
    return rows


def _tomec_kernel_names() -> set[str]:
    from triton.runtime.jit import JITFunction

    kernels.load()
    names = set()
    for module in kernels.MODULES:
        mod = importlib.import_module(f"tomec.kernels.{module}")
        names |= {v.__name__ for v in vars(mod).values() if isinstance(v, JITFunction)}
    return names


def failures(rows: Sequence[InductorRow], cc: int = 90) -> list[str]:
    """Compile errors, shared memory above the target's limit, and spills in tomec's kernels (Inductor
    drops its own spilling autotuning configs at run time, so those are reported, not failed)."""
    out = []
    limit = aot.SHARED_LIMIT.get(cc)
    for r in rows:
        if r.error:
            out.append(f"{r.kernel} [{r.config}]: {r.error}")
        elif limit is not None and r.shared > limit:
            out.append(f"{r.kernel} [{r.config}]: shared memory {r.shared} B above {limit} B")
        elif r.tomec and r.spills:
            out.append(f"{r.kernel} [{r.config}]: {r.spill_stores} B spill stores, {r.stack} B stack (spills)")
    return out


def dynamo_graph(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, list]:
    """The Dynamo FX graph of ``model(x)`` (no grad, one graph) and its example inputs."""
    captured = {}

    def capture(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(x)
    return captured["gm"], captured["inputs"]


def as_fake_cuda(gm: torch.fx.GraphModule, inputs: Sequence) -> tuple[list, Any]:
    """Re-type a CPU Dynamo graph as a CUDA one, in place: fake CUDA placeholders, the metadata
    re-propagated. Returns ``(fake inputs, their FakeTensorMode)``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = []
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), inputs):
        with mode:
            fake = torch.empty(value.shape, dtype=value.dtype, device="cuda")
        if isinstance(value, torch.nn.Parameter):
            fake = torch.nn.Parameter(fake, requires_grad=False)
        node.meta["example_value"] = fake
        fakes.append(fake)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta.pop("val")
    return fakes, mode


def merged_graph(model_name: str = "test_vit", method: str = "tome", r: int = 30,
                 dtype: torch.dtype = torch.float16, batch: int = 2, **options: Any):
    """A timm model's Dynamo graph on fake CUDA tensors, rewritten by tomec: ``(gm, inputs, mode)``."""
    import timm  # seconds to import: only this graph needs it

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval().to(dtype)
    side = model.pretrained_cfg["input_size"][-1]
    gm, inputs = dynamo_graph(model, torch.randn(batch, 3, side, side).to(dtype))
    fakes, mode = as_fake_cuda(gm, inputs)
    result = rewrite(gm, fakes, TomecConfig(method=method, r=r, compiler="eager", **options))
    return result.gm, fakes, mode


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_vit")
    parser.add_argument("--method", default="tome")
    parser.add_argument("--r", type=int, default=30)
    parser.add_argument("--cc", type=int, default=90)
    args = parser.parse_args(argv)
    gm, inputs, mode = merged_graph(args.model, args.method, args.r, trace_source=True)
    rows = compile_generated(generated_code(gm, inputs, mode, args.cc), args.cc)
    for r in rows:
        note = r.error or ("spills" if r.spills else "")
        print(f"{r.kernel[:60]:60} {r.registers:4} regs {r.stack:4} B stack {r.shared:6} B shared "
              f"{'tomec' if r.tomec else '':5} {note}")
    bad = failures(rows, args.cc)
    for line in bad:
        print("FAIL", line)
    names = {r.kernel for r in rows}
    print(f"{len(names)} kernels, {len(rows)} configurations compiled for sm_{args.cc}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
