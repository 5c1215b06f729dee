"""Every Triton kernel tomec launches, compiled ahead of time for real GPU targets, without a GPU.

The launches are recorded, not written out: every method's block step (``tomec.methods.merge_step``,
the call the graph pass inserts) runs with ``impl="triton"`` on ``device="meta"`` tensors over a grid
of shapes, with the kernel launches intercepted (:func:`tomec.kernels.aot.record`). Each distinct
configuration is then compiled with Triton's ahead-of-time compiler for ``sm_80`` (A100), ``sm_90``
(H100/H200) and ``sm_100`` (B200), and ``cuobjdump -res-usage`` reads registers, stack and local
memory off the cubin; spills are what ptxas's own ``-v`` report counts (a stack frame alone can be
the call frame of fp64 division's slow path).

    python -m tomec.bench.aot                 # writes bench/results/kernels-aot.json
    python -m tomec.bench.aot --targets 90 --quick

Checks (``tests/test_kernels_aot.py`` runs them in ``make test``): every configuration compiles; none
spills to local memory at the shapes of DeiT-S, ViT-B and ViT-L; none uses more shared memory than
its target allows a block.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tqdm import tqdm

from tomec import kernels, methods, ops
from tomec.bench import inductor_aot
from tomec.kernels import aot

RESULTS = Path(__file__).resolve().parent / "results"

# name: (width, heads); head widths 64 (DeiT to ViT-L), 80 (ViT-H/14), 128 (InternViT-6B)
MODELS = {
    "deit_ti": (192, 3), "deit_s": (384, 6), "vit_b": (768, 12), "vit_l": (1024, 16),
    "vit_h": (1280, 16), "internvit_6b": (3200, 25),
}
# 5 (a 32 px toy) to 2305 (48 x 48 patches + CLS: ViT-L/16 at 768 px, or 672 px at patch 14)
TOKENS = (5, 50, 197, 577, 1025, 2305)
BATCHES = (1, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGETS = (90, 80, 100)
NO_SPILL_MODELS = ("deit_s", "vit_b", "vit_l")  # a spill at these shapes fails the check
NUM_LAYERS = 12
PROTECTED = 1


@dataclass(frozen=True)
class Shape:
    """One block's input: ``batch`` images of ``tokens`` tokens, ``width`` channels in ``heads``."""

    model: str
    width: int
    heads: int
    tokens: int
    batch: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.model} N={self.tokens} B={self.batch} {str(self.dtype).replace('torch.', '')}"


def shapes(models: Iterable[str] = MODELS, tokens: Iterable[int] = TOKENS,
           batches: Iterable[int] = BATCHES, dtypes: Iterable[torch.dtype] = DTYPES) -> list[Shape]:
    """The grid of shapes (fp64 is added once, at DeiT-S size: its kernels compile too)."""
    grid = [Shape(m, *MODELS[m], n, b, dt) for m in models for n in tokens for b in batches for dt in dtypes]
    return grid


FP64_SHAPE = Shape("deit_s", 384, 6, 197, 2, torch.float64)


def kernel_methods() -> list[str]:
    """The registered methods whose block step can launch a Triton kernel (all but DCT's matmul)."""
    return [m for m in methods.available() if methods.get(m).match is not None]


def _options(name: str, r: int) -> methods.Options:
    spec = methods.get(name)
    given = {}
    if name == "ltmp":  # pruning only happens with calibrated counts
        given = {"counts": {"merge": [r - r // 2] * NUM_LAYERS, "prune": [r // 2] * NUM_LAYERS}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DTEM's random-heads and LTMP's no-counts warnings
        logging.getLogger("tomec").disabled = True
        try:
            return spec.make_options(given)
        finally:
            logging.getLogger("tomec").disabled = False


def _layers(name: str, options: methods.Options) -> list[int]:
    """Blocks that take every branch of the method: its first reduction block (no sizes yet, no
    source map) and a later one (sizes and source map threaded)."""
    spec = methods.get(name)
    if name == "atc":  # all three reduction blocks: one per linkage (the kernel's LINKAGE variants)
        return spec.reduction_blocks(options, NUM_LAYERS)
    if spec.reduction_blocks is not None:
        return spec.reduction_blocks(options, NUM_LAYERS)[:2]
    return [0, NUM_LAYERS - 1]


def step_calls(name: str, shape: Shape, device: str = "meta") -> list[tuple[tuple, dict]]:
    """``merge_step``'s arguments for method ``name``'s block steps at ``shape`` on ``device``: one
    call for its first block (no sizes, no source map yet), one for a later block. On a real device
    the tensors hold random values (sizes >= 1, a valid source map)."""
    spec = methods.get(name)
    d = shape.width // shape.heads
    b, n = shape.batch, shape.tokens
    real = device != "meta"
    g = torch.Generator(device=device).manual_seed(0) if real else None

    def tensor(*dims: int, dtype: torch.dtype = shape.dtype) -> torch.Tensor:
        if not real:
            return torch.empty(*dims, device=device, dtype=dtype)
        return torch.randn(*dims, device=device, generator=g).to(dtype)

    # q and k are views of one fused qkv projection, as timm's blocks make them
    q, k, _ = tensor(b, n, 3, shape.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    x = tensor(b, n, shape.width)
    r = max(1, (n - PROTECTED) // 8)
    options = _options(name, r)
    calls = []
    for i, layer in enumerate(_layers(name, options)):
        size = source = None
        if i > 0:
            size = tensor(b, n, 1).abs() + 1 if real else tensor(b, n, 1)
            source = (torch.arange(n, device=device).expand(b, n).contiguous() if real
                      else tensor(b, n, dtype=torch.int64))
        call_options = options.graph_args()
        if name == "atc":
            call_options["linkage"] = ops.LINKAGES[i]
        kwargs = dict(
            method=name, r=r, protected=PROTECTED, layer=layer, num_layers=NUM_LAYERS,
            scale=d ** -0.5, trace_source=True, impl="triton", options=call_options,
        )
        if "attn_in" in spec.graph_inputs:
            kwargs["attn_in"] = x
        if spec.params is not None:
            params = spec.params(options, layer=layer, num_layers=NUM_LAYERS, channels=shape.width,
                                 head_dim=d)
            kwargs["params"] = {p: t.to(device=device, dtype=shape.dtype) for p, t in params.items()}
        calls.append(((x, size, source, k, q), kwargs))
    return calls


@functools.lru_cache(maxsize=None)
def step_launches(name: str, shape: Shape) -> list[list[aot.Launch]]:
    """The kernel launches of method ``name``'s block steps at ``shape`` (recorded, not run), one
    list per call of :func:`step_calls`; recorded once per process (the same for every target;
    not to be mutated)."""
    steps = []
    for args, kwargs in step_calls(name, shape):
        with aot.record() as launches:
            methods.merge_step(*args, **kwargs)
        steps.append(launches)
    return steps


@dataclass
class Config:
    """One distinct compilation: a kernel configuration and the shapes it serves."""

    spec: aot.Specialization
    serves: set[tuple[str, str]]  # (method, shape label)
    models: set[str]


def configs(cc: int, grid: Sequence[Shape], with_attrs: bool = True, progress: bool = False,
            method_names: Optional[Sequence[str]] = None) -> list[Config]:
    """The distinct configurations the grid launches on ``cc`` (``with_attrs=False``: one per kernel
    configuration, whatever the divisibility of its integer arguments)."""
    found: dict[tuple, Config] = {}
    cases = [(m, s) for s in grid for m in (method_names or kernel_methods())]
    for name, shape in tqdm(cases, desc=f"recording sm_{cc}", disable=not progress):
        for launch in (launch for step in step_launches(name, shape) for launch in step):
            spec = aot.specialize(launch, cc)
            entry = found.setdefault(spec.key(with_attrs), Config(spec, set(), set()))
            entry.serves.add((name, shape.label))
            entry.models.add(shape.model)
    return list(found.values())


@dataclass
class Row:
    """A compiled configuration as ``kernels-aot.json`` records it."""

    kernel: str
    target: str
    constexprs: dict
    num_warps: int
    registers: int
    stack: int
    local: int
    spill_stores: Optional[int]
    spill_loads: Optional[int]
    shared: int
    spills: bool
    error: Optional[str]
    problems: list[str]
    seconds: float
    methods: list[str]
    models: list[str]
    example: str


def compile_all(cc: int, grid: Sequence[Shape], with_attrs: bool = True, progress: bool = False,
                method_names: Optional[Sequence[str]] = None) -> list[Row]:
    """Compile every configuration of ``grid`` for ``cc``; the spill rule is applied to the rows."""
    rows = []
    found = configs(cc, grid, with_attrs, progress, method_names)
    for config in tqdm(found, desc=f"compiling sm_{cc}", disable=not progress):
        result = aot.compile_for(config.spec, cc)
        problems = list(result.problems)
        spill_models = sorted(config.models & set(NO_SPILL_MODELS))
        if result.spills and spill_models:
            problems.append(
                f"{result.spill_text()} (register spills) at the shapes of {', '.join(spill_models)}"
            )
        example = sorted(config.serves)[0]
        rows.append(Row(
            kernel=result.name, target=f"sm_{cc}", constexprs=result.constexprs, num_warps=result.num_warps,
            registers=result.registers, stack=result.stack, local=result.local,
            spill_stores=result.spill_stores, spill_loads=result.spill_loads, shared=result.shared,
            spills=result.spills, error=result.error, problems=problems, seconds=round(result.seconds, 3),
            methods=sorted({m for m, _ in config.serves}), models=sorted(config.models),
            example=f"{example[0]} at {example[1]}",
        ))
    return rows


def failures(rows: Iterable[Row]) -> list[str]:
    """One line per configuration that failed to compile or broke a limit."""
    out = []
    for row in rows:
        if row.error:
            out.append(f"{row.kernel} on {row.target} ({row.example}, {row.constexprs}): {row.error}")
        for problem in row.problems:
            out.append(f"{row.kernel} on {row.target} ({row.example}, {row.constexprs}): {problem}")
    return out


def summary(rows: Sequence[Row]) -> list[dict]:
    """Per kernel and target: configurations, the most registers and shared memory, spills."""
    table = {}
    for row in rows:
        entry = table.setdefault((row.kernel, row.target), dict(
            kernel=row.kernel, target=row.target, configs=0, max_registers=0, max_shared=0,
            spilling_configs=0, failed=0))
        entry["configs"] += 1
        entry["max_registers"] = max(entry["max_registers"], row.registers)
        entry["max_shared"] = max(entry["max_shared"], row.shared)
        entry["spilling_configs"] += int(row.spills)
        entry["failed"] += int(bool(row.error or row.problems))
    return sorted(table.values(), key=lambda e: (e["kernel"], e["target"]))


def inductor_summary(cc: int = 90) -> dict:
    """The kernels Inductor generates for a merged fp16 model (timm's test_vit, ToMe with the source
    map) on a faked ``cc`` GPU, compiled for it (tomec.bench.inductor_aot)."""
    gm, inputs, mode = inductor_aot.merged_graph("test_vit", "tome", 30, trace_source=True)
    rows = inductor_aot.compile_generated(inductor_aot.generated_code(gm, inputs, mode, cc), cc)
    spilling = sorted({r.kernel for r in rows if r.spills and not r.tomec})
    return dict(
        graph="timm test_vit, fp16, batch 2, method tome, r=30, trace_source", target=f"sm_{cc}",
        kernels=len({r.kernel for r in rows}), configs=len(rows),
        tomec_kernels=sorted({r.kernel for r in rows if r.tomec}),
        max_registers=max(r.registers for r in rows), max_shared=max(r.shared for r in rows),
        inductor_kernels_with_a_spilling_config=spilling, failures=inductor_aot.failures(rows, cc),
    )


def _meta() -> dict:
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__, "machine": platform.node(),
            "note": "compiled ahead of time on a CPU-only machine; no kernel ran"}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--quick", action="store_true", help="DeiT-S and ViT-L at N=197 only")
    parser.add_argument("--methods", default=None, help="only these methods' kernels (comma-separated)")
    parser.add_argument("--no-inductor", dest="inductor", action="store_false",
                        help="skip the kernels Inductor generates for a merged model (bench/inductor_aot.py)")
    parser.add_argument("--out", default=str(RESULTS / "kernels-aot.json"))
    args = parser.parse_args(argv)
    if kernels.unavailable_reason() is not None:
        raise SystemExit(kernels.unavailable_reason())
    grid = shapes(("deit_s", "vit_l"), (197,)) if args.quick else shapes() + [FP64_SHAPE]
    rows: list[Row] = []
    names = args.methods.split(",") if args.methods else None
    for cc in (int(t) for t in args.targets.split(",")):
        # sm_90 (the H100/H200 the launchers size their grids for) sees every divisibility variant
        # of the integer arguments; the other targets one compile per configuration
        rows += compile_all(cc, grid, with_attrs=cc == 90, progress=True, method_names=names)
    bad = failures(rows)
    generated = None
    if args.inductor:
        generated = inductor_summary()
        bad += generated["failures"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        dict(meta=_meta(), summary=summary(rows), failures=bad, inductor=generated,
             configs=[asdict(r) for r in rows]), indent=1))
    for entry in summary(rows):
        print(f"{entry['kernel']:28} {entry['target']:7} {entry['configs']:4} configs  "
              f"regs <= {entry['max_registers']:3}  shared <= {entry['max_shared']:6} B  "
              f"spilling {entry['spilling_configs']}  failed {entry['failed']}")
    for line in bad:
        print("FAIL", line)
    print(f"wrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
