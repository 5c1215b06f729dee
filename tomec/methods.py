"""Method registry: what each token-merging method plugs into the shared pipeline.

A method supplies a *matcher*, ``match(keys, r, protected, *, layer, num_layers, impl, **options)
-> dest`` (``keys``: the attention keys ``[B, H, N, d]`` that enter attention; ``dest``: the ``[B, N]``
int64 destination map), the per-block cap of its schedule and its options.
Everything else (the merge, size threading, proportional attention, source maps) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from . import ops
from .errors import ConfigError
from .schedule import CapFn, tome_cap

__all__ = ["Method", "register", "get", "available"]


@dataclass(frozen=True)
class Method:
    """A token-merging method as the pipeline sees it."""

    name: str
    summary: str
    match: Callable[..., Tensor]
    cap: CapFn = tome_cap
    options: Mapping[str, Any] = field(default_factory=dict)
    supports_source: bool = True

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``options``; unknown names are an error that lists the valid ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(
                f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {valid}"
            )
        return {**self.options, **options}


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (name clashes are an error)."""
    if method.name in _REGISTRY:
        raise ConfigError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def available() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is an error that lists the known ones."""
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(available())}")
    return _REGISTRY[name.lower()]


def _tome_match(
    keys: Tensor, r: int, protected: int, *, layer: int, num_layers: int, impl: str = "torch"
) -> Tensor:
    return ops.bipartite_match(keys, r, protected, impl=impl)


register(
    Method(
        name="tome",
        summary="ToMe (ICLR'23): bipartite soft matching on the attention keys",
        match=_tome_match,
    )
)
