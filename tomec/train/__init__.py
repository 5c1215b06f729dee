"""What trains the learned parts of the methods, with the backbone frozen.

- :mod:`tomec.train.vit`: the one timm ViT forward they share with the eager reference
  (:mod:`tomec.reference`): embedding, attention with token sizes, key weights and the gate, pooling.
- :mod:`tomec.train.common`: the frozen backbone and the task loss.
- :mod:`tomec.train.dtem`: DTEM's heads, trained by soft merging (:func:`tomec.train.dtem.train_heads`).
- :mod:`tomec.train.diffrate`: DiffRate's schedule search (:func:`tomec.train.diffrate.search_diffrate`).
- :mod:`tomec.train.ltmp`: LTMP's thresholds, learned (:func:`tomec.train.ltmp.train_thresholds`) and
  calibrated to static counts (:func:`tomec.train.ltmp.calibrate`).
- :mod:`tomec.train.fpet`: FPET's refinement adapter (:func:`tomec.train.fpet.train_adapter`).

The methods' inference side (their ops, options and weights' forms) lives in :mod:`tomec.methods`,
which never imports this package. The submodules load on first attribute access
(``tomec.train.dtem``), so the reference importing :mod:`tomec.train.vit` pays for nothing else.
"""

from __future__ import annotations

import importlib

_SUBMODULES = frozenset({"common", "diffrate", "dtem", "fpet", "ltmp", "vit"})


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
