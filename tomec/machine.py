"""What every result file records about the machine it was measured on, and where result files go."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["RESULTS", "device_name", "machine"]

_CHECKOUT = Path(__file__).resolve().parent.parent
# The default folder of the result files (throughput, the fine-tuning studies): from a source
# checkout, the repository's records in bench/results/ (the ones the README quotes, kept as they
# were before this code moved out of bench/); an installed tomec has no such folder and writes to
# the working directory. A path only: nothing of bench/ is imported.
RESULTS = (_CHECKOUT / "bench" / "results" if (_CHECKOUT / "pyproject.toml").is_file()
           and (_CHECKOUT / "bench").is_dir() else Path("."))


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:  # not installed, or a broken install
        return None


def _driver_version() -> Optional[str]:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def device_name(device: str) -> str:
    """The GPU's name for ``"cuda"``, else the CPU's."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def machine(device: str) -> dict[str, Any]:
    """Machine, CPU, GPU (name, compute capability, driver), CUDA, torch, Triton, threads."""
    info: dict[str, Any] = {
        "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "triton": _triton_version(), "threads": torch.get_num_threads(), "device": device_name(device),
        "gpu": None,
    }
    if device == "cuda":
        cc = torch.cuda.get_device_capability()
        info.update(gpu=torch.cuda.get_device_name(), compute_capability=f"sm_{cc[0]}{cc[1]}",
                    cuda=torch.version.cuda, driver=_driver_version(),
                    gpu_count=torch.cuda.device_count())
    return info
