"""tomec's kernel launches, recorded instead of executed, and compiled for GPU targets without a GPU.

:func:`record` is a context in which every ``wrap_triton(kernel)[grid](...)`` of the kernel modules
is recorded as a :class:`Launch` and not run, and every ``torch.ops.tomec`` op runs its launcher
directly, so the op layer can be driven with ``device="meta"`` tensors: the launches recorded are
the ones the launchers really produce for those shapes, dtypes and flags.

:func:`specialize` turns a launch into what Triton's own launcher would compile for a target (the
signature, the ``constexpr`` values, the divisibility attributes of pointers and integers, the
options such as ``num_warps``), by running Triton's binder; :func:`compile_for` compiles it with
Triton's ahead-of-time compiler (``triton.compile(ASTSource(...), target=GPUTarget(...))``, ptxas
ships with Triton) and reads registers, stack and local memory off the cubin with ``cuobjdump
-res-usage`` (also shipped). Neither needs a GPU. Both use Triton internals of the version this
project develops with (3.8); on a machine with a GPU, :func:`warmup` compiles a launch for the
current device through the public ``JITFunction.warmup``.

Every kernel declares its cost for the performance model as Triton's ``launch_metadata`` hook
(``@triton.jit(launch_metadata=...)``, the hook Triton's profiler reads): :meth:`Launch.cost`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from . import MODULES, load

__all__ = [
    "Launch", "Specialization", "Compiled", "record", "specialize", "compile_for", "warmup",
    "SHARED_LIMIT", "COST_KEYS",
]

# Shared memory a block may use (opt-in maximum, bytes) per compute capability: CUDA C Programming
# Guide, "Technical Specifications per Compute Capability".
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
                120: 101376}
# What a kernel's launch_metadata returns (all totals over the whole grid):
# flops: operations on the CUDA cores (an FMA counts 2; a compare or select 1);
# tc_flops: FLOPs on the tensor cores (16-bit inputs, fp32 accumulation);
# bytes: distinct bytes of global memory read and written (every element once: the DRAM minimum);
# loads: every byte the programs load or store, re-reads of the same data included.
COST_KEYS = ("flops", "tc_flops", "bytes", "loads")


@dataclass
class Launch:
    """One recorded launch: ``kernel[grid](*args, **kwargs)``."""

    kernel: Any  # triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict[str, Any]
    op: Optional[str] = None  # the torch.ops.tomec op that launched it

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n

    def bound(self) -> dict[str, Any]:
        """Every kernel parameter by name (defaults applied), launch options left out."""
        names = self.kernel.arg_names
        values = dict(zip(names, self.args))
        values.update({k: v for k, v in self.kwargs.items() if k in names})
        return values

    def cost(self) -> dict[str, float]:
        """The kernel's own cost declaration for this launch (``launch_metadata``), zeros filled in."""
        fn = getattr(self.kernel, "launch_metadata", None)
        if fn is None:
            raise ValueError(f"kernel {self.name} declares no cost (launch_metadata)")
        declared = fn(self.grid, None, self.bound())
        unknown = set(declared) - set(COST_KEYS) - {"name"}
        if unknown:
            raise ValueError(f"kernel {self.name} declares unknown cost keys {sorted(unknown)}")
        return {k: float(declared.get(k, 0.0)) for k in COST_KEYS}


class _Recorder:
    """Stands in for ``wrap_triton``: ``_Recorder(kernel)[grid](*args, **kwargs)`` records."""

    def __init__(self, sink: list[Launch], ops: list[str], kernel: Any) -> None:
        self.sink, self.ops, self.kernel = sink, ops, kernel

    def __getitem__(self, grid: Any):
        grid = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))

        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append(Launch(self.kernel, grid, args, kwargs, self.ops[-1] if self.ops else None))

        return launch


def _tagged(name: str, fn: Any, ops: list[str]) -> Any:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        ops.append(name)
        try:
            return fn(*args, **kwargs)
        finally:
            ops.pop()

    return run


def _custom_ops(module: Any) -> list[Any]:
    from torch._library.custom_ops import CustomOpDef

    return [v for v in vars(module).values() if isinstance(v, CustomOpDef) and v._namespace == "tomec"]


@contextlib.contextmanager
def record() -> Iterator[list[Launch]]:
    """Within the context, kernel launches are appended to the yielded list instead of running, and
    ``torch.ops.tomec.<op>`` calls run the op's launcher on any device (``meta`` included)."""
    load()
    launches: list[Launch] = []
    running: list[str] = []  # the ops being executed, innermost last
    modules = [importlib.import_module(f"{__package__}.{m}") for m in MODULES]
    namespace = torch.ops.tomec
    saved_wrap = [(m, m.wrap_triton) for m in modules]
    ops = [op for m in modules for op in _custom_ops(m)]
    saved_ops = [(op._name, getattr(namespace, op._name)) for op in ops]
    try:
        for m in modules:
            m.wrap_triton = functools.partial(_Recorder, launches, running)
        for op in ops:
            setattr(namespace, op._name, _tagged(op._name, op._init_fn, running))
        yield launches
    finally:
        for m, wrap in saved_wrap:
            m.wrap_triton = wrap
        for name, packet in saved_ops:
            setattr(namespace, name, packet)


@dataclass(frozen=True)
class Specialization:
    """What Triton compiles for a launch on a target."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def named_constexprs(self) -> dict[str, Any]:
        names = self.kernel.arg_names
        return {names[k[0]]: (v if isinstance(v, (bool, int, float, str)) else str(v))
                for k, v in sorted(self.constexprs.items())}

    def key(self, with_attrs: bool = True) -> tuple:
        """Identifies one compilation (``with_attrs=False``: one per kernel configuration, whatever
        the divisibility of its integer arguments)."""
        opts = tuple(sorted((k, self.options[k]) for k in ("num_warps", "num_stages", "num_ctas")
                            if k in self.options))
        parts = (self.name, tuple(self.signature.items()),
                 tuple(sorted((k, str(v)) for k, v in self.constexprs.items())), opts)
        if with_attrs:
            parts += (tuple(sorted((k, str(v)) for k, v in self.attrs.items())),)
        return parts


def _target(cc: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", cc, 32)


@functools.lru_cache(maxsize=None)
def _backend(cc: int):
    from triton.compiler import make_backend

    return make_backend(_target(cc))


@functools.lru_cache(maxsize=None)
def _binder(kernel: Any, cc: int) -> Any:
    """Triton's argument binder of ``kernel`` for ``cc`` (built by exec: once per kernel and target)."""
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(kernel.signature, kernel.params, _backend(cc))


def specialize(launch: Launch, cc: int) -> Specialization:
    """The signature, constexprs, attributes and options Triton's launcher computes for ``launch``
    on compute capability ``cc`` (pointers of meta tensors are 0-based, so aligned as a CUDA
    allocation; their offsets count)."""
    kernel, backend = launch.kernel, _backend(cc)
    bound, specialization, options = _binder(kernel, cc)(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, launch.kwargs, bound, specialization, options
    )
    return Specialization(kernel, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__))


@dataclass
class Compiled:
    """One kernel configuration compiled for one target, with what the cubin reports."""

    name: str
    cc: int
    constexprs: dict[str, Any]
    num_warps: int
    registers: int = 0  # per thread
    stack: int = 0  # bytes per thread of stack frame (spills, and the frames of calls such as fp64 division)
    local: int = 0  # bytes per thread of local memory
    spill_stores: Optional[int] = None  # bytes per thread, from ptxas's own report (None: no report)
    spill_loads: Optional[int] = None
    shared: int = 0  # bytes per block: dynamic (Triton's) + static
    seconds: float = 0.0
    error: Optional[str] = None
    problems: list[str] = field(default_factory=list)

    @property
    def spills(self) -> bool:
        """Registers spilled to local memory, as ptxas reports it; without its report, any stack or
        local memory counts (a call frame, as fp64 division's slow path needs, is not a spill)."""
        return spills(self.spill_stores, self.spill_loads, self.stack, self.local)

    def spill_text(self) -> str:
        if self.spill_stores is not None:
            return f"{self.spill_stores} B spill stores / {self.spill_loads} B spill loads per thread"
        return f"{self.stack} B stack / {self.local} B local memory per thread"


def _cuobjdump() -> Optional[str]:
    import triton

    shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return shipped if os.path.exists(shipped) else shutil.which("cuobjdump")


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack, static shared, local) of the one kernel in ``cubin``."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton ships it under triton/backends/nvidia/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = _RES.search(out)
    if found is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage: {out!r}")
    return tuple(int(v) for v in found.groups())  # type: ignore[return-value]


def compile_for(spec: Specialization, cc: int) -> Compiled:
    """Compile ``spec`` for compute capability ``cc`` (Triton's AOT compiler, no GPU) and read its
    resources; a compile error is returned in ``error``, limits broken in ``problems``."""
    import triton
    from triton.compiler import ASTSource

    result = Compiled(spec.name, cc, spec.named_constexprs(), int(spec.options.get("num_warps", 4)))
    start = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
        with ptxas_report(log):
            compiled = triton.compile(src, target=_target(cc), options=spec.options)
    except Exception as e:  # Triton's CompilationError, ptxas errors: reported, not raised
        result.error = f"{type(e).__name__}: {error_summary(str(e))}"
        result.seconds = time.perf_counter() - start
        return result
    result.seconds = time.perf_counter() - start
    result.spill_stores, result.spill_loads = spill_bytes(log.getvalue())
    regs, stack, static_shared, local = cubin_resources(compiled.asm["cubin"])
    result.registers, result.stack, result.local = regs, stack, local
    result.shared = int(compiled.metadata.shared) + static_shared
    limit = SHARED_LIMIT.get(cc)
    if limit is not None and result.shared > limit:
        result.problems.append(f"shared memory {result.shared} B above the sm_{cc} limit of {limit} B")
    return result


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def spills(stores: Optional[int], loads: Optional[int], stack: int, local: int) -> bool:
    """Whether a cubin spills registers: ptxas's spill counts where its report was read, else any
    stack or local memory."""
    if stores is not None:
        return stores > 0 or bool(loads)
    return stack > 0 or local > 0


def spill_bytes(report: str) -> tuple[Optional[int], Optional[int]]:
    """(spill stores, spill loads) in bytes per thread from a ptxas ``-v`` report; (None, None)
    when the report has no such line."""
    found = _SPILLS.search(report)
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


@contextlib.contextmanager
def ptxas_report(out: io.StringIO) -> Iterator[None]:
    """Compile afresh (a cached cubin has no report) with ptxas's ``-v`` report printed into ``out``
    (Triton prints it when ``dump_ptxas_log`` is set; a Triton without the knobs prints nothing)."""
    from triton import knobs

    nvidia, compilation = getattr(knobs, "nvidia", None), getattr(knobs, "compilation", None)
    if not (hasattr(nvidia, "dump_ptxas_log") and hasattr(compilation, "always_compile")):
        yield
        return
    with nvidia.scope(), compilation.scope(), contextlib.redirect_stdout(out):
        nvidia.dump_ptxas_log = True
        compilation.always_compile = True
        yield


def error_summary(text: str, n: int = 6) -> str:
    """The last ``n`` non-empty lines of a compiler error, on one line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])


def warmup(launch: Launch) -> Any:
    """Compile ``launch`` for the current CUDA device without running it (``JITFunction.warmup``);
    raises what the compiler raises."""
    return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
