"""tomec: a torch.compile backend that adds token merging to any Vision Transformer.

    fast = torch.compile(model, backend=tomec.backend(method="tome", r=100))
"""

from . import methods, ops, schedule
from .api import TomecBackend, backend
from .config import TomecConfig
from .errors import (
    ConfigError,
    ScheduleError,
    TomecError,
    UnsupportedDtypeError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "backend",
    "TomecBackend",
    "TomecConfig",
    "methods",
    "ops",
    "schedule",
    "TomecError",
    "ConfigError",
    "ScheduleError",
    "UnsupportedModelError",
    "UnsupportedDtypeError",
]
