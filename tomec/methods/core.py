"""What a token-reduction method is to the pipeline, the registry, and the one block step.

A method is a *matcher* (``match(MatchInput, options) -> MatchResult``: the destination map
``dest [B, N]``, and the merge weights and sizes when the method weighs the merge itself) or, for
methods that do not merge (DCT), a *transform* of the tokens. Its options are one frozen dataclass,
validated on construction. :func:`merge_step` is the block step both the compiled path (one
inserted call per block) and the eager reference run, so the two cannot drift apart: it computes the
block's :class:`LayerMerge` (removed, dropped, epilogue) once, hands it to the matcher, and applies
the shared merge, sizes and source map.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping, Optional, Union

from torch import Tensor

from tomec import ops
from tomec.errors import ConfigError
from tomec.schedule import CapFn, tome_cap

__all__ = [
    "Options", "LayerMerge", "MatchInput", "MatchResult", "Method", "register", "get",
    "available", "merge_step", "merge_step_ahead", "check_bool", "check_int", "check_real", "advise",
]

log = logging.getLogger("tomec")

Site = Literal["attention", "block", "ahead"]


# --- typed options --------------------------------------------------------------------------------


def check_bool(method: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a :class:`ConfigError` naming the option."""
    if not isinstance(value, bool):
        raise ConfigError(f"{method}: {name} must be True or False, got {value!r}")
    return value


def check_int(method: str, name: str, value: Any, *, minimum: int = 0, optional: bool = False,
              kind: str = "", what: str = "") -> Optional[int]:
    """``value`` as an int ``>= minimum`` (or None when ``optional``); else an error naming it."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = kind or f"an int >= {minimum}"
        raise ConfigError(
            f"{method}: {name} must be {kind}{what}, got {value!r}"
        )
    return int(value)


def check_real(method: str, name: str, value: Any, *, optional: bool = False, kind: str = "a number",
               what: str = "", valid: Callable[[float], bool] = lambda v: True) -> Optional[float]:
    """``value`` as a float (or None when ``optional``) passing ``valid``; else an error naming it."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not valid(float(value)):
        raise ConfigError(
            f"{method}: {name} must be {kind}{what}, got {value!r}"
        )
    return float(value)


@dataclass(frozen=True)
class Options:
    """Base of a method's options: a frozen dataclass whose ``__post_init__`` validates and
    normalizes its fields (through :meth:`_set`).

    Class attributes say how the pipeline reads them: ``param_fields`` make the block's learned
    tensors (:attr:`Method.params`) and never reach the matcher or the graph; ``schedule_field``
    carries a method's own schedule when it is not None.
    """

    method: ClassVar[str] = ""
    param_fields: ClassVar[tuple[str, ...]] = ()
    schedule_field: ClassVar[Optional[str]] = None

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Options":
        """Options from keyword values; an unknown name is an error that lists the valid ones."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            valid = ", ".join(sorted(cls.names())) or "none"
            raise ConfigError(
                f"method {cls.method!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {valid}"
            )
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Every field (shallow)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def graph_args(self) -> dict[str, Any]:
        """The fields a block step's graph node carries (plain values: FX writes them as code)."""
        return {k: v for k, v in self.as_dict().items() if k not in self.param_fields}

    @classmethod
    def from_graph_args(cls, values: Mapping[str, Any]) -> "Options":
        """The options back from :meth:`graph_args` (already validated: no second check, which
        would otherwise run in every block of every call of an eagerly run graph); the
        ``param_fields`` take their defaults, the matcher never reads them."""
        out = object.__new__(cls)
        for f in dataclasses.fields(cls):
            value = values[f.name] if f.name in values else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            object.__setattr__(out, f.name, value)
        return out

    def owns_schedule(self) -> bool:
        """Whether these options define the schedule instead of ``r`` / ``schedule=``."""
        return self.schedule_field is not None and getattr(self, self.schedule_field) is not None


def advise(message: str) -> None:
    """A method's warning about its options (weak defaults), as a warning and a log line."""
    warnings.warn(message, stacklevel=5)  # the user call that configured the backend
    log.warning(message)


# --- the matcher's input and result --------------------------------------------------------------


@dataclass(frozen=True)
class LayerMerge:
    """One block's reduction, fixed at compile time."""

    r: int  # tokens removed
    n_dropped: int = 0  # of those, dropped (pruned) rather than merged
    mode: str = "mean"  # merge epilogue (ops.MERGE_MODES)


@dataclass(frozen=True)
class MatchInput:
    """What a matcher sees at one block.

    ``keys``/``queries`` ``[B, H, N, d]`` of the block's attention; ``x [B, N, C]`` the tokens the
    merge applies to; ``size [B, N, 1]`` the sizes entering the block (None: all ones); ``attn_in
    [B, N, C]`` the tokens entering the attention projections (methods that ask, see
    :attr:`Method.graph_inputs`); ``params`` the block's learned tensors (:attr:`Method.params`).
    ``r`` tokens go, ``n_dropped`` of them dropped rather than merged (:func:`merge_step` computes
    the block's :class:`LayerMerge` once).
    """

    keys: Tensor
    queries: Optional[Tensor]
    x: Tensor
    size: Optional[Tensor]
    r: int
    n_dropped: int
    protected: int
    layer: int
    num_layers: int
    scale: Optional[float] = None
    prop_attn: bool = True
    impl: str = "torch"
    attn_in: Optional[Tensor] = None
    params: Mapping[str, Tensor] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class MatchResult:
    """A matcher's answer: ``dest [B, N]`` int64 (``-1``: dropped); ``weights [B, N, 1]`` of the
    merge (None: the sizes); ``sizes [B, N, 1]`` to sum into the merged sizes (None: the input's)."""

    dest: Tensor
    weights: Optional[Tensor] = None
    sizes: Optional[Tensor] = None


Matcher = Callable[[MatchInput, Any], MatchResult]
Transform = Callable[..., Tensor]  # (x, r, protected, *, impl) -> x


def _one_merge(options: Any, layer: int, num_layers: int, r: int) -> LayerMerge:
    return LayerMerge(r)


def _attention_site(options: Any) -> Site:
    return "attention"


@dataclass(frozen=True)
class Method:
    """A token-reduction method as the pipeline sees it.

    Attributes:
        name: registry name.
        options: its options class (frozen dataclass, validated on construction).
        match / transform: exactly one (a transform for methods that do not merge: DCT).
        site: where the step sits, from the options: after the attention residual ("attention"),
            after the MLP residual ("block"), or at the block's input one step ahead ("ahead",
            :func:`merge_step_ahead`).
        cap: per-block cap on ``r`` for the schedule.
        layer_merge: ``(options, layer, num_layers, r) -> LayerMerge`` (what ``r`` means there).
        schedule: ``(options, num_layers, num_tokens, protected) -> counts`` when the options carry
            their own schedule (:meth:`Options.owns_schedule`).
        reduction_blocks: ``(options, num_layers) -> block indices`` for methods that reduce at a
            few blocks only (None: every block).
        params: ``(options, *, layer, num_layers, channels, head_dim) -> {name: tensor}``, the
            block's learned tensors; the compiled path registers them on the graph module.
        graph_inputs: optional graph values the matcher needs (``"attn_in"``).
        supports_source: the step keeps a source map (False for DCT).
        reorders_at_r0: the step runs at blocks whose count is 0 (it still reorders the tokens).
        advise: ``options -> warning or None``, said once when a backend is configured.
    """

    name: str
    options: type[Options]
    match: Optional[Matcher] = None
    transform: Optional[Transform] = None
    site: Callable[[Any], Site] = _attention_site
    cap: CapFn = tome_cap
    layer_merge: Callable[[Any, int, int, int], LayerMerge] = _one_merge
    schedule: Optional[Callable[[Any, int, int, int], list[int]]] = None
    reduction_blocks: Optional[Callable[[Any, int], Optional[list[int]]]] = None
    params: Optional[Callable[..., Mapping[str, Tensor]]] = None
    graph_inputs: tuple[str, ...] = ()
    supports_source: bool = True
    reorders_at_r0: bool = False
    advise: Optional[Callable[[Any], Optional[str]]] = None

    def make_options(self, options: Union[Options, Mapping[str, Any], None] = None) -> Options:
        """Validated options: an instance of :attr:`options`, or keyword values for one."""
        if isinstance(options, self.options):
            return options
        if isinstance(options, Options):
            raise ConfigError(
                f"method {self.name!r} takes {self.options.__name__}, got {type(options).__name__}"
            )
        return self.options.from_mapping(dict(options or {}))


_REGISTRY: dict[str, Method] = {}
GRAPH_INPUTS = ("attn_in",)


def register(method: Method) -> Method:
    """Add a method to the registry (name clashes are an error)."""
    if method.name in _REGISTRY:
        raise ConfigError(f"method {method.name!r} is already registered")
    if (method.match is None) == (method.transform is None):
        raise ConfigError(f"method {method.name!r} needs exactly one of match= or transform=")
    bad = set(method.graph_inputs) - set(GRAPH_INPUTS)
    if bad:
        raise ConfigError(f"method {method.name!r} asks for unknown graph inputs {sorted(bad)}")
    if method.options.method != method.name:
        raise ConfigError(f"{method.options.__name__}.method is {method.options.method!r}, "
                          f"not {method.name!r}")
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


# --- the block step -----------------------------------------------------------------------------


def _options_of(spec: Method, options: Union[Options, Mapping[str, Any], None]) -> Options:
    """The step's options: the typed object (eager reference), or a graph node's plain fields."""
    if isinstance(options, Options):
        return options
    return spec.options.from_graph_args(options or {})


def _match(x, size, keys, queries, *, method, r, protected, layer, num_layers, scale, prop_attn, impl,
           options, attn_in, params) -> tuple[MatchResult, LayerMerge]:
    spec = get(method)
    opts = _options_of(spec, options)
    plan = spec.layer_merge(opts, layer, num_layers, r)
    found = spec.match(
        MatchInput(keys=keys, queries=queries, x=x, size=size, r=r, n_dropped=plan.n_dropped,
                   protected=protected, layer=layer, num_layers=num_layers, scale=scale,
                   prop_attn=prop_attn, impl=impl, attn_in=attn_in, params=dict(params or {})),
        opts,
    )
    return found, plan


def _merge(x, size, source, found: MatchResult, plan: LayerMerge, trace_source: bool, impl: str):
    """The shared merge (sizes summed) and the source map composed."""
    merge_size = size if found.sizes is None else found.sizes
    x, size = ops.merge(x, merge_size, found.dest, x.shape[1] - plan.r, found.weights,
                        n_dropped=plan.n_dropped, mode=plan.mode, impl=impl)
    if trace_source:
        source = ops.compose_source(source, found.dest, impl=impl)
    return x, size, source


def merge_step(
    x: Tensor,
    size: Optional[Tensor],
    source: Optional[Tensor],
    keys: Tensor,
    queries: Optional[Tensor] = None,
    *,
    method: str,
    r: int,
    protected: int,
    layer: int,
    num_layers: int,
    scale: Optional[float] = None,
    prop_attn: bool = True,
    trace_source: bool = False,
    impl: str = "torch",
    options: Union[Options, Mapping[str, Any], None] = None,
    attn_in: Optional[Tensor] = None,
    params: Optional[Mapping[str, Tensor]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One block's merge: match, merge with sizes, compose the source map.

    Args:
        x: ``[B, N, C]`` the tokens after the attention residual.
        size: ``[B, N, 1]`` sizes entering the block (None: all ones).
        source: ``[B, N0]`` source map so far (None: identity), used when ``trace_source``.
        keys, queries: ``[B, H, N, d]`` of the block's attention.
        options: the method's options (or, in a graph node, their :meth:`Options.graph_args`).
        attn_in: ``[B, N, C]`` the tokens entering the attention projections (methods that ask).
        params: the block's learned tensors (``Method.params``), for methods that have them.

    Returns:
        ``x [B, N - r, C]``, ``size [B, N - r, 1]``, ``source [B, N0]`` (None without tracing).
    """
    found, plan = _match(
        x, size, keys, queries, method=method, r=r, protected=protected, layer=layer,
        num_layers=num_layers, scale=scale, prop_attn=prop_attn, impl=impl, options=options,
        attn_in=attn_in, params=params,
    )
    return _merge(x, size, source, found, plan, trace_source, impl)


def merge_step_ahead(
    x: Tensor,
    size: Optional[Tensor],
    source: Optional[Tensor],
    keys: Tensor,
    queries: Tensor,
    *,
    method: str,
    r: int,
    protected: int,
    layer: int,
    num_layers: int,
    scale: Optional[float] = None,
    prop_attn: bool = True,
    trace_source: bool = False,
    impl: str = "torch",
    options: Union[Options, Mapping[str, Any], None] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """One block's merge one step ahead (MCTF's official ``one_step_ahead=1``), at the block's input.

    The block's attention on the unmerged tokens, ``P = softmax(q kᵀ · scale + log size)``, decides
    the merge (its column means are the informativeness); the block input ``x`` merges with the
    matcher's weights, and so does ``P``: columns summed over each group, rows the groups' weighted
    means (the same weights), so every row still sums to 1. The block then computes its values on the
    merged tokens and its attention output as ``P_merged @ v`` (not recomputed).

    Args:
        x: ``[B, N, C]`` the block's input (the residual stream).
        size: ``[B, N, 1]`` sizes entering the block (None: all ones); source: ``[B, N0]`` or None.
        keys, queries: ``[B, H, N, d]`` of the block's attention on the unmerged tokens.

    Returns:
        ``x [B, N - r, C]``, ``size [B, N - r, 1]``, ``source`` (None without tracing) and the merged
        attention probabilities ``[B, H, N - r, N - r]`` (fp32; fp64 for fp64 inputs).
    """
    found, plan = _match(
        x, size, keys, queries, method=method, r=r, protected=protected, layer=layer,
        num_layers=num_layers, scale=scale, prop_attn=prop_attn, impl=impl, options=options,
        attn_in=None, params=None,
    )
    probs = ops.attention_probs(queries, keys, size if prop_attn else None, scale)
    weights = found.weights if found.weights is not None else (size if found.sizes is None else found.sizes)
    merged_probs = ops.merge_attention(probs, found.dest, weights, x.shape[1] - r, plan.n_dropped)
    return (*_merge(x, size, source, found, plan, trace_source, impl), merged_probs)
