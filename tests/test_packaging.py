"""The distribution: kernels/ and passes/ ship inside tomec, the backend is registered by name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("tomec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"tomec", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for module in ("tomec/kernels/match.py", "tomec/kernels/merge.py", "tomec/passes/blocks.py",
                   "tomec/ops/merge.py", "tomec/bench/throughput.py", "tomec/data/digits/vit_digits.pt"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"[torch_dynamo_backends]" in entry_points and b"tomec = tomec.api:tomec_dynamo_backend" in entry_points
    assert b"[console_scripts]" in entry_points and b"tomec = tomec.cli:main" in entry_points
