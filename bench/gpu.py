"""``make gpu``: every GPU test and benchmark of tomec in one call, into one folder.

Made for a borrowed, bare GPU machine (torch, Triton, timm and pytest preinstalled, no package
index, minutes of time): nothing is installed, the package runs from this checkout (``PYTHONPATH``),
and each step runs in its own process with a time limit taken from one budget, so a slow step
cannot eat the others' time; a step that no longer fits is skipped and says so. Every result file
carries the GPU, driver, CUDA, torch and Triton versions; ``gpu-run.json`` lists every step with its
status, seconds, files and log.

Steps: ``env`` (the machine), ``tests`` (``tests/test_gpu.py``), ``kernels`` (``bench/kernels.py``),
``kernel_model`` (the model's table with the measured times beside it), ``attention``
(``bench/attention.py``), then throughput runs: DeiT-S, ViT-B and ViT-L/16 at 384 px, bf16,
r = 13 per block, the unmerged model under Inductor, the reference patch under Inductor and tomec,
at batch 256 and at batch 1 with ``mode="reduce-overhead"`` (CUDA graphs).

    make gpu OUT=/path/to/out                    # or: python3 bench/gpu.py --out DIR
    python3 bench/gpu.py --dry-run --out DIR     # CPU, tiny shapes: walks every step (make test does)

Only the standard library is imported here: this file must run before tomec can be imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 450  # the whole run; the borrowed machine gives about ten minutes, its start included


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: int  # the most this step may take
    need_s: int = 20  # skipped when less than this is left
    always: bool = False  # runs whatever is left of the budget (the machine's record), within limit_s
    status: str = "pending"
    seconds: float = 0.0
    returncode: Optional[int] = None
    reason: str = ""
    log: str = ""
    files: list[str] = field(default_factory=list)


# (timm model, blocks): r = 13 per block
MODELS = (("deit_small_patch16_224", 12), ("vit_base_patch16_224", 12), ("vit_large_patch16_384", 24))
PROVIDERS = "inductor,reference_inductor,tomec"


def throughput_steps(out: Path, dry_run: bool) -> list[Step]:
    """Batch 256 and batch 1 under CUDA graphs per model, the most informative first. The dry run:
    timm's test_vit on the CPU, tomec only, its graph run uncompiled (``compiler=eager``)."""
    steps = []
    models = (("test_vit", 6),) if dry_run else MODELS
    for model, depth in models:
        short = model.split("_patch")[0]
        for batch, mode in ((256, None), (1, "reduce-overhead")):
            argv = ["-m", "tomec.bench.throughput", "--models", model, "--methods", "tome",
                    "--r", str((2 if dry_run else 13) * depth), "--inflect", "0",
                    "--providers", "tomec" if dry_run else PROVIDERS,
                    "--batch", str(2 if dry_run and batch > 1 else batch),
                    "--dtype", "float32" if dry_run else "bfloat16",
                    "--device", "cpu" if dry_run else "cuda", "--rounds", "1" if dry_run else "5",
                    "--reps", "1" if dry_run else "10", "--out", str(out),
                    "--tag", f"gpu-{short}-b{batch}" + ("-cudagraphs" if mode else "")]
            if mode:
                argv += ["--mode", mode]
            if dry_run:
                argv += ["--option", "compiler=eager"]
            steps.append(Step(f"throughput {short} batch {batch}" + (f" {mode}" if mode else ""), argv,
                              limit_s=240, need_s=60 if not dry_run else 10))
    return steps


def plan(out: Path, dry_run: bool) -> list[Step]:
    # the dry run: CPU, fp32, the smallest shapes, no Inductor compile where a step allows it
    kernels = ["--device", "cpu", "--quick", "--providers", "eager,triton"] if dry_run else []
    attention = ["--device", "cpu", "--quick", "--impls", "sdpa_no_bias,mask"] if dry_run else []
    return [
        Step("env", ["-c", "import json, torch, tomec, tomec.machine as m; "
                           "print(json.dumps(dict(m.machine('cuda' if torch.cuda.is_available() else 'cpu'), "
                           "tomec=tomec.__file__, tomec_path=list(tomec.__path__))))"], limit_s=120, always=True),
        Step("tests", ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py",
                       f"--junitxml={out / 'test_gpu.xml'}"], limit_s=200, need_s=30),
        Step("kernels", ["-m", "tomec.bench.kernels", "--out", str(out), *kernels], limit_s=90),
        Step("kernel_model", ["-m", "tomec.bench.kernel_model", "--measure",
                              "--out", str(out / "kernels-model.json")], limit_s=90),
        Step("attention", ["-m", "tomec.bench.attention", "--out", str(out), *attention], limit_s=90),
        *throughput_steps(out, dry_run),
    ]


def run(out: Path, dry_run: bool = False, budget_s: float = BUDGET_S, python: str = sys.executable) -> list[Step]:
    """Run every step, each within what is left of ``budget_s``; write ``gpu-run.json``."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONUNBUFFERED="1", TOMEC_GPU_RUN="dry" if dry_run else "gpu")
    start = time.monotonic()
    steps = plan(out, dry_run)
    for step in steps:
        left = budget_s - (time.monotonic() - start)
        if step.always:
            _run_step(step, out, env, python, step.limit_s)
        elif left < step.need_s:
            step.status, step.reason = "skipped", f"{left:.0f} s of the {budget_s:.0f} s budget left, it needs {step.need_s} s"
        else:
            _run_step(step, out, env, python, min(step.limit_s, left))
        print(f"[{time.monotonic() - start:6.0f} s] {step.name}: {step.status} {step.reason}".rstrip(), flush=True)
        _write_summary(out, steps, dry_run, budget_s, time.monotonic() - start)
    return steps


def _run_step(step: Step, out: Path, env: dict, python: str, limit: float) -> None:
    log = out / f"{step.name.replace(' ', '-')}.log"
    before = {p.name for p in out.iterdir()}
    began = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {python} {' '.join(step.argv)}\n")
        f.flush()
        try:
            proc = subprocess.run([python, *step.argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=limit)
            step.returncode = proc.returncode
            step.status = "ok" if proc.returncode == 0 else "failed"
            if proc.returncode == 5 and step.name == "tests":  # pytest: nothing collected
                step.status = "failed"
        except subprocess.TimeoutExpired:
            step.status, step.reason = "timeout", f"stopped after {limit:.0f} s"
    step.seconds = round(time.monotonic() - began, 1)
    step.log = log.name
    if step.name == "env" and step.status == "ok":
        lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
        (out / "env.json").write_text(lines[-1] + "\n" if lines else "{}\n")
    step.files = sorted({p.name for p in out.iterdir()} - before - {log.name})
    if step.status != "ok" and not step.reason:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        step.reason = f"exit code {step.returncode}: {tail[0][:200]}"


def _write_summary(out: Path, steps: list[Step], dry_run: bool, budget_s: float, elapsed: float) -> None:
    env = {}
    if (out / "env.json").exists():
        try:
            env = json.loads((out / "env.json").read_text())
        except ValueError:
            pass
    summary = dict(machine=env, dry_run=dry_run, budget_s=budget_s, elapsed_s=round(elapsed, 1),
                   steps=[asdict(s) for s in steps])
    (out / "gpu-run.json").write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results" / "gpu"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check that every step runs")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    args = parser.parse_args(argv)
    steps = run(Path(args.out), args.dry_run, args.budget)
    failed = [s.name for s in steps if s.status in ("failed", "timeout")]
    print(f"wrote {Path(args.out) / 'gpu-run.json'}; " + (f"failed: {', '.join(failed)}" if failed else "no step failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
