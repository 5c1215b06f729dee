"""The backend's configuration, validated when it is built (before any model is traced)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

from . import methods, schedule as schedules
from .errors import ConfigError
from .ops.common import IMPLS

__all__ = ["TomecConfig", "COMPILERS", "PROP_ATTN_IMPLS"]

COMPILERS = ("inductor", "eager")
# How SDPA calls get the log(size) bias: "mask" (SDPA attn_mask), "manual" (the explicit chain
# softmax(q kᵀ·scale + log size) v), "extra_dim" (log size as an extra head dimension, no mask, so
# flash kernels apply), "flex" (FlexAttention score_mod). "auto": "manual" on CPU (faster there at
# merged token counts), "mask" on CUDA until bench/attention.py has ranked the three on a GPU.
PROP_ATTN_IMPLS = ("auto", "mask", "manual", "extra_dim", "flex")


@dataclass(frozen=True)
class TomecConfig:
    """Everything ``tomec.backend(...)`` takes; see its docstring for the meaning of each field."""

    method: str = "tome"
    r: Optional[int] = None
    inflect: float = -0.5
    schedule: Optional[schedules.ScheduleSpec] = None
    prop_attn: bool = True
    prop_attn_impl: str = "auto"
    impl: str = "auto"
    protect: Union[str, int] = "auto"
    trace_source: bool = False
    compiler: str = "inductor"
    strict: bool = True
    method_options: Union[methods.Options, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = methods.get(self.method)
        object.__setattr__(self, "method", spec.name)
        object.__setattr__(self, "method_options", spec.make_options(self.method_options))
        own = self.method_options.owns_schedule()
        if own and (self.r is not None or self.schedule is not None):
            raise ConfigError(
                f"method {spec.name!r} takes its schedule from its options here; drop r= / schedule="
            )
        if not own and self.r is None and self.schedule is None:
            raise ConfigError("give r= (tokens to remove in total) or schedule= (per-block counts)")
        if self.r is not None and self.schedule is not None:
            raise ConfigError(f"give r= or schedule=, not both (got r={self.r!r} and a schedule)")
        if self.r is not None:
            object.__setattr__(self, "r", schedules.check_r(self.r))
        object.__setattr__(self, "inflect", schedules.check_inflect(self.inflect))
        if isinstance(self.schedule, list):
            for i, v in enumerate(self.schedule):
                if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                    raise ConfigError(f"schedule[{i}] must be a non-negative integer, got {v!r}")
        for name in ("prop_attn", "trace_source", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.trace_source and not spec.supports_source:
            raise ConfigError(f"method {spec.name!r} does not support source tracking")
        if self.compiler not in COMPILERS:
            raise ConfigError(f"compiler={self.compiler!r}; choose one of {COMPILERS}")
        if self.impl not in IMPLS:
            raise ConfigError(f"impl={self.impl!r}; choose one of {IMPLS}")
        if self.prop_attn_impl not in PROP_ATTN_IMPLS:
            raise ConfigError(f"prop_attn_impl={self.prop_attn_impl!r}; choose one of {PROP_ATTN_IMPLS}")
        if self.protect != "auto" and (
            isinstance(self.protect, bool)
            or not isinstance(self.protect, numbers.Integral)
            or self.protect < 0
        ):
            raise ConfigError(f"protect must be 'auto' or a non-negative int, got {self.protect!r}")
        advice = spec.advise(self.method_options) if spec.advise is not None else None
        if advice:
            methods.core.advise(advice)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @property
    def method_spec(self) -> methods.Method:
        return methods.get(self.method)

    @property
    def site(self) -> str:
        """Where the method's step sits with these options ("attention", "block" or "ahead")."""
        return self.method_spec.site(self.method_options)

    def resolve_schedule(self, num_layers: int, num_tokens: int, num_protected: int) -> list[int]:
        """Per-block token counts for a model with these dimensions (see :mod:`tomec.schedule`)."""
        spec = self.method_spec
        if self.method_options.owns_schedule():
            return spec.schedule(self.method_options, num_layers, num_tokens, num_protected)
        blocks = None
        if spec.reduction_blocks is not None:
            blocks = spec.reduction_blocks(self.method_options, num_layers)
        return schedules.resolve(
            num_layers,
            num_tokens,
            num_protected,
            r=self.r,
            inflect=self.inflect,
            schedule=self.schedule,
            cap=spec.cap,
            blocks=blocks,
        )
