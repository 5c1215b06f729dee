"""tomec: a torch.compile backend that adds token merging to any Vision Transformer.

    fast = torch.compile(model, backend=tomec.backend(method="tome", r=100))
"""

from pathlib import Path as _Path

# Run from a source checkout without installing (PYTHONPATH=<checkout>, as `make gpu` does on a bare
# GPU machine): the distribution maps the checkout's kernels/, passes/ and bench/ folders to
# tomec.kernels, tomec.passes and tomec.bench; looking up subpackages in the checkout too does the same.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "kernels" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (the package's own __path__)

from . import methods, ops, presets, schedule  # noqa: E402
from .api import TomecBackend, backend  # noqa: E402
from .config import TomecConfig  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    KernelCompileError,
    ScheduleError,
    TomecError,
    UnsupportedDtypeError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

# Submodules the README names that are heavier (timm, matplotlib, training loops) or would import
# back into the package: loaded on first attribute access, so ``import tomec; tomec.reference.patch``
# works without making ``import tomec`` pay for them.
_LAZY_SUBMODULES = frozenset({
    "reference", "flops", "vis", "train", "demo", "kernel_check", "cli", "cli_args", "passes", "kernels", "bench",
    "models", "evaluate", "throughput", "digits", "machine", "files",
})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)

__all__ = [
    "backend",
    "TomecBackend",
    "TomecConfig",
    "methods",
    "ops",
    "presets",
    "schedule",
    "TomecError",
    "ConfigError",
    "KernelCompileError",
    "ScheduleError",
    "UnsupportedModelError",
    "UnsupportedDtypeError",
]
