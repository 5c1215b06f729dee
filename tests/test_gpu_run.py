"""``make gpu`` (bench/gpu.py) walked on the CPU: every step runs, so the first GPU run has no typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402  (bench/gpu.py: a script, importable by path; stdlib only)


@pytest.mark.slow
def test_the_dry_run_walks_every_step(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "gpu-run.json").read_text())
    statuses = {s["name"]: (s["status"], s["reason"]) for s in summary["steps"]}
    assert proc.returncode == 0, (statuses, proc.stdout[-2000:])
    assert [s["name"] for s in summary["steps"]] == [s.name for s in gpu.plan(tmp_path, dry_run=True)]
    assert all(status == "ok" for status, _ in statuses.values()), statuses
    # the package ran from this checkout, and the machine is recorded
    env = json.loads((tmp_path / "env.json").read_text())
    assert Path(env["tomec"]).resolve().is_relative_to(ROOT) and env["torch"]
    assert summary["machine"]["torch"] == env["torch"]
    # GPU-only parts say they were skipped and why
    assert "needs a CUDA GPU" in (tmp_path / "tests.log").read_text()
    assert "--measure: skipped, no CUDA device" in (tmp_path / "kernel_model.log").read_text()
    assert "triton provider skipped" in (tmp_path / "kernels.log").read_text()
    assert (tmp_path / "test_gpu.xml").exists()
    # every benchmark wrote its results with the machine in them
    model = json.loads((tmp_path / "kernels-model.json").read_text())
    assert model["rows"] and model["measured_on"] is None
    for name in ("kernels-cpu.json", "attention-cpu.json", "throughput-gpu-test_vit-b256.json",
                 "throughput-gpu-test_vit-b1-cudagraphs.json"):
        meta = json.loads((tmp_path / name).read_text())["meta"]
        assert meta["torch"] == env["torch"], name
    rows = json.loads((tmp_path / "throughput-gpu-test_vit-b1-cudagraphs.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"reduce-overhead"} and {r["batch"] for r in rows} == {1}


def test_a_step_that_no_longer_fits_the_budget_is_skipped(tmp_path):
    # below every later step's need (10 s at least), whatever the machine's speed; the machine's
    # record runs anyway
    steps = gpu.run(tmp_path, dry_run=True, budget_s=5)
    assert steps[0].name == "env" and steps[0].status == "ok"
    later = [s for s in steps[1:]]
    assert min(s.need_s for s in later) > 5
    assert later and all(s.status == "skipped" and "budget" in s.reason for s in later)
    summary = json.loads((tmp_path / "gpu-run.json").read_text())
    assert [s["status"] for s in summary["steps"]][1:] == ["skipped"] * len(later)
