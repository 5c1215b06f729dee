"""The token-reduction methods: one module each, registered on import.

Each module holds the method's ops, its typed options (a frozen dataclass validated on
construction), its matcher ``match(MatchInput, options) -> MatchResult``, its schedule rule and its
:func:`~tomec.methods.core.register` call. The registry and the block step shared by the compiled
path and the eager reference (:func:`merge_step`) are in :mod:`tomec.methods.core`. Every module of
this package is imported (so registered) with it: a new method is one new module here.
"""

import importlib
import pkgutil

from .atc import AtcOptions, atc_cap
from .core import (
    LayerMerge, MatchInput, MatchResult, Method, Options, available, get, merge_step, merge_step_ahead, register,
)
from .crossget import CrossgetOptions
from .dct import DctOptions
from .diffrate import DiffrateOptions, DiffRateKeptWarning, load_diffrate_kept
from .dtem import DtemOptions
from .fpet import FpetOptions
from .ltmp import LtmpOptions, load_ltmp_counts, load_ltmp_thresholds
from .mctf import MctfOptions, mctf_cap
from .pitome import PitomeOptions, pitome_margin, pitome_uses_bsm
from .tofu import TofuOptions, tofu_prunes
from .tome import TomeOptions

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "core":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Method", "Options", "LayerMerge", "MatchInput", "MatchResult", "register", "get", "available",
    "merge_step", "merge_step_ahead", "AtcOptions", "CrossgetOptions", "DctOptions",
    "DiffrateOptions", "DtemOptions", "FpetOptions", "LtmpOptions", "MctfOptions", "PitomeOptions",
    "TofuOptions", "TomeOptions", "DiffRateKeptWarning", "load_diffrate_kept", "load_ltmp_counts",
    "load_ltmp_thresholds", "tofu_prunes", "atc_cap", "mctf_cap", "pitome_margin", "pitome_uses_bsm",
]
