"""Method registry: what each token-reduction method plugs into the shared pipeline.

Most methods are a *matcher*: ``match(keys, r, protected, *, layer, num_layers, impl, **inputs,
**options)`` returns the destination map ``dest [B, N]`` (or ``(dest, w, size)`` when the method
weighs the merge itself); :func:`merge_step` applies it with the shared merge, sizes and source map.
Methods that do not merge (DCT) supply a ``transform`` of the tokens instead. Both the compiled path
(one inserted call per block) and the eager reference run :func:`merge_step` / the transform, so the
two cannot drift apart.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from . import ops
from .errors import ConfigError, ScheduleError
from .schedule import CapFn, tome_cap

__all__ = ["Method", "LayerMerge", "register", "get", "available", "merge_step", "MATCH_INPUTS"]

# Graph values a matcher may ask for besides the keys: the block's tokens after the attention
# residual, the queries, the sizes entering the block, the attention's logit scale.
MATCH_INPUTS = ("x", "q", "size", "scale", "prop_attn")


@dataclass(frozen=True)
class LayerMerge:
    """One block's reduction, fixed at compile time."""

    r: int  # tokens removed
    n_dropped: int = 0  # of those, dropped (pruned) rather than merged
    mode: str = "mean"  # merge epilogue (ops.MERGE_MODES)


@dataclass(frozen=True)
class Method:
    """A token-reduction method as the pipeline sees it."""

    name: str
    summary: str
    match: Optional[Callable[..., Any]] = None
    transform: Optional[Callable[..., Tensor]] = None  # (x, r, protected, *, impl) -> x, for DCT
    inputs: tuple[str, ...] = ()  # extra matcher inputs, from MATCH_INPUTS
    returns_weights: bool = False  # the matcher returns (dest, w, size)
    site: str = "attention"  # after the attention residual, or "block": after the MLP residual
    cap: CapFn = tome_cap
    options: Mapping[str, Any] = field(default_factory=dict)
    supports_source: bool = True
    tracks_size: bool = True  # False: no sizes, so no proportional attention either
    training: str = "no: off the shelf"
    layer_merge: Callable[[int, int, int, Mapping[str, Any]], LayerMerge] = (
        lambda layer, num_layers, r, options: LayerMerge(r)
    )
    # A method's own schedule (a searched one), when its options carry one:
    # (options, num_layers, num_tokens, protected) -> per-block counts
    schedule: Optional[Callable[[Mapping[str, Any], int, int, int], list[int]]] = None
    schedule_option: Optional[str] = None  # the option that carries it
    check: Optional[Callable[[Mapping[str, Any]], dict[str, Any]]] = None  # option validation

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``options``; unknown names are an error that lists the valid ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(
                f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {valid}"
            )
        merged = {**self.options, **options}
        return self.check(merged) if self.check else merged

    def owns_schedule(self, options: Mapping[str, Any]) -> bool:
        """Whether ``options`` (checked) define the schedule instead of ``r``/``schedule=``."""
        return self.schedule_option is not None and options.get(self.schedule_option) is not None


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (name clashes are an error)."""
    if method.name in _REGISTRY:
        raise ConfigError(f"method {method.name!r} is already registered")
    if (method.match is None) == (method.transform is None):
        raise ConfigError(f"method {method.name!r} needs exactly one of match= or transform=")
    bad = set(method.inputs) - set(MATCH_INPUTS)
    if bad:
        raise ConfigError(f"method {method.name!r} asks for unknown inputs {sorted(bad)}")
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
    options: Optional[Mapping[str, Any]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One block's merge: match, merge with sizes, compose the source map.

    Args:
        x: ``[B, N, C]`` the tokens after the attention residual.
        size: ``[B, N, 1]`` sizes entering the block (None: all ones).
        source: ``[B, N0]`` source map so far (None: identity), used when ``trace_source``.
        keys, queries: ``[B, H, N, d]`` of the block's attention.

    Returns:
        ``x [B, N - r, C]``, ``size [B, N - r, 1]``, ``source [B, N0]`` (None without tracing).
    """
    spec = get(method)
    options = dict(options or {})
    plan = spec.layer_merge(layer, num_layers, r, options)
    available_inputs = {"x": x, "q": queries, "size": size, "scale": scale, "prop_attn": prop_attn}
    extra = {name: available_inputs[name] for name in spec.inputs}
    found = spec.match(
        keys, r, protected, layer=layer, num_layers=num_layers, impl=impl, **extra, **options
    )
    dest, w, merge_size = found if spec.returns_weights else (found, None, size)
    x, size = ops.merge(
        x, merge_size, dest, x.shape[1] - r, w, n_dropped=plan.n_dropped, mode=plan.mode, impl=impl
    )
    if trace_source:
        source = ops.compose_source(source, dest, impl=impl)
    return x, size, source


# --- ToMe ---------------------------------------------------------------------------------------


def _tome_match(keys, r, protected, *, layer, num_layers, impl="torch"):
    return ops.bipartite_match(keys, r, protected, impl=impl)


register(
    Method(
        name="tome",
        summary="ToMe (ICLR'23): bipartite soft matching on the attention keys",
        match=_tome_match,
    )
)


# --- ToFu ---------------------------------------------------------------------------------------


def _tofu_prunes(layer: int, num_layers: int) -> bool:
    return layer < num_layers / 2


def _tofu_match(keys, r, protected, *, layer, num_layers, impl="torch"):
    drop = _tofu_prunes(layer, num_layers)
    return ops.bipartite_match(keys, r, protected, drop_sources=drop, impl=impl)


register(
    Method(
        name="tofu",
        summary="ToFu (WACV'24): ToMe's matching; prune in the first half, norm-preserving merge after",
        match=_tofu_match,
        layer_merge=lambda layer, num_layers, r, options: (
            LayerMerge(r, n_dropped=r) if _tofu_prunes(layer, num_layers)
            else LayerMerge(r, mode="norm_preserving")
        ),
    )
)


# --- PiToMe -------------------------------------------------------------------------------------


def pitome_margin(layer: int, num_layers: int) -> float:
    """PiToMe's energy margin of a block (its public code): ``0.75 - 0.75 · layer / num_layers``."""
    return 0.75 - 0.75 * layer / num_layers


def pitome_uses_bsm(layer: int, num_layers: int, bsm_first: bool = True) -> bool:
    """Which variant a block runs: the first ``⌈L/2⌉`` blocks are "bsm" (the last ones for MAE)."""
    first_half = layer < math.ceil(num_layers / 2)
    return first_half if bsm_first else not first_half


def _pitome_match(keys, r, protected, *, layer, num_layers, impl="torch", bsm_first=True, margin=None):
    m = pitome_margin(layer, num_layers) if margin is None else margin
    bsm = pitome_uses_bsm(layer, num_layers, bsm_first)
    return ops.pitome_match(keys, r, protected, margin=m, bsm=bsm, impl=impl)


def _check_pitome(options: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(options["bsm_first"], bool):
        raise ConfigError(f"pitome: bsm_first must be True or False, got {options['bsm_first']!r}")
    margin = options["margin"]
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, numbers.Real)):
        raise ConfigError(f"pitome: margin must be a number or None (per-block schedule), got {margin!r}")
    return options


register(
    Method(
        name="pitome",
        summary="PiToMe (NeurIPS'24): energy-ordered matching that keeps unique tokens",
        match=_pitome_match,
        options={"bsm_first": True, "margin": None},
        check=_check_pitome,
    )
)


# --- DCT ----------------------------------------------------------------------------------------


def _dct_transform(x, r, protected, *, impl="torch"):
    return ops.dct_truncate(x, x.shape[1] - r, protected, impl=impl)


register(
    Method(
        name="dct",
        summary="DCT (Fourier Transformer, ACL'23): drop the highest token frequencies after the MLP",
        transform=_dct_transform,
        site="block",
        supports_source=False,
        tracks_size=False,
    )
)


# --- DiffRate -----------------------------------------------------------------------------------


def load_diffrate_kept(kept: Any) -> dict[str, list[int]]:
    """A searched DiffRate schedule: ``{"prune_kept": [...], "merge_kept": [...]}`` (tokens kept per
    block after pruning and after merging, protected tokens included), or a path to such JSON."""
    if isinstance(kept, (str, Path)):
        path = Path(kept)
        if not path.is_file():
            raise ConfigError(f"diffrate: kept schedule file {str(path)!r} does not exist")
        try:
            kept = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"diffrate: {path} is not JSON: {e}") from e
    if not isinstance(kept, Mapping) or set(kept) != {"prune_kept", "merge_kept"}:
        raise ConfigError(
            "diffrate: kept must map 'prune_kept' and 'merge_kept' to per-block token counts, "
            f"got {kept!r}"
        )
    out = {}
    for name in ("prune_kept", "merge_kept"):
        values = kept[name]
        if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in values
        ):
            raise ConfigError(f"diffrate: {name} must be a list of positive ints, got {values!r}")
        out[name] = [int(v) for v in values]
    if len(out["prune_kept"]) != len(out["merge_kept"]):
        raise ConfigError(
            f"diffrate: prune_kept has {len(out['prune_kept'])} entries, merge_kept "
            f"{len(out['merge_kept'])}"
        )
    return out


def _diffrate_plan(kept: Mapping[str, list[int]], num_layers: int, num_tokens: int, protected: int):
    """Per-block (removed, pruned) from kept counts; an error names the first impossible block."""
    if len(kept["merge_kept"]) != num_layers:
        raise ScheduleError(
            f"diffrate: the kept schedule has {len(kept['merge_kept'])} entries but the model has "
            f"{num_layers} attention blocks"
        )
    plan, n = [], num_tokens
    for layer, (pk, mk) in enumerate(zip(kept["prune_kept"], kept["merge_kept"])):
        pk, mk = min(pk, n), min(mk, n, pk)  # as the official code: counts never grow
        if mk <= protected:
            raise ScheduleError(
                f"diffrate: block {layer} keeps {mk} tokens, not more than the {protected} protected"
            )
        plan.append((n - mk, n - pk))
        n = mk
    return plan


def _diffrate_schedule(options, num_layers, num_tokens, protected):
    return [r for r, _ in _diffrate_plan(options["kept"], num_layers, num_tokens, protected)]


def _diffrate_layer(layer: int, num_layers: int, r: int, options: Mapping[str, Any]) -> LayerMerge:
    if options["kept"] is None:
        return LayerMerge(r)  # off the shelf: merging only
    if r == 0:
        return LayerMerge(0)
    pk, mk = options["kept"]["prune_kept"][layer], options["kept"]["merge_kept"][layer]
    n_in = r + min(mk, pk)  # the block keeps min(mk, pk) of its tokens when it removes any
    return LayerMerge(r, n_dropped=max(n_in - pk, 0))


def _diffrate_match(keys, r, protected, *, layer, num_layers, x, q, size, scale, prop_attn,
                    impl="torch", kept=None):
    n_dropped = _diffrate_layer(layer, num_layers, r, {"kept": kept}).n_dropped
    return ops.diffrate_match(
        x, q, keys, size, r, protected, n_dropped=n_dropped, scale=scale, prop_attn=prop_attn,
        impl=impl,
    )


def _check_diffrate(options: dict[str, Any]) -> dict[str, Any]:
    if options["kept"] is not None:
        options["kept"] = load_diffrate_kept(options["kept"])
    return options


register(
    Method(
        name="diffrate",
        summary="DiffRate (ICCV'23): prune and merge by the CLS token's attention",
        match=_diffrate_match,
        inputs=("x", "q", "size", "scale", "prop_attn"),
        returns_weights=True,
        options={"kept": None},
        check=_check_diffrate,
        schedule=_diffrate_schedule,
        schedule_option="kept",
        layer_merge=_diffrate_layer,
        training="searched schedules from DiffRate's search (kept= option); no search here",
    )
)
