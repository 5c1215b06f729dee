"""Triton kernels and their launch wrappers (they import nothing of tomec).

The kernels register as ``torch.library.triton_op``s in the ``tomec`` namespace
(``torch.ops.tomec.bipartite_match``, ``merge``, ``compose_source``, ``pitome_match``,
``attention_received``, ``atc_cluster_triton``, ``crossget_rowmax``)
with fake functions, so Inductor sees into them and CUDA graphs capture them. Importing this package
does not import Triton; :func:`load` does.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

__all__ = ["load", "unavailable_reason", "interpreting", "MODULES"]

# The kernel modules (each launches through its own ``wrap_triton`` name: kernels.aot records there).
MODULES = ("atc", "attention_received", "crossget", "match", "merge", "pitome")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why the Triton kernels cannot be used here, or None when they can."""
    try:
        import triton  # noqa: F401
        from torch.library import triton_op  # noqa: F401
    except Exception as e:  # ImportError, or a broken Triton install
        return f"Triton cannot be imported ({type(e).__name__}: {e})"
    return None


def load() -> None:
    """Import the kernel modules, registering the ``torch.ops.tomec`` Triton ops."""
    reason = unavailable_reason()
    if reason is not None:
        raise ImportError(reason)
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")
