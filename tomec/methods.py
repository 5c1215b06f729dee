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
import logging
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from . import ops
from .errors import ConfigError, ScheduleError
from .schedule import CapFn, check_blocks, tome_cap

__all__ = ["Method", "LayerMerge", "register", "get", "available", "merge_step", "merge_step_ahead",
           "MATCH_INPUTS"]

# Graph values a matcher may ask for besides the keys: the block's tokens after the attention
# residual, the queries, the sizes entering the block, the attention's logit scale, the tokens
# entering the attention projections (after the block's first norm, ``[B, N, C]``).
MATCH_INPUTS = ("x", "q", "size", "scale", "prop_attn", "attn_in")


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
    # An option that moves the merge to the block's input, one step ahead (MCTF): the block's
    # attention on the unmerged tokens picks the merge and, merged, replaces the attention (site
    # "ahead"; :func:`merge_step_ahead`).
    ahead_option: Optional[str] = None
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
    # Learned per-block tensors (DTEM's heads): (options, *, layer, num_layers, channels, head_dim)
    # -> {name: tensor}, passed to the matcher as keywords. The compiled path registers them on the
    # graph module (get_attr nodes, never node constants); ``param_options`` name the options they
    # are made from, which the matcher does not receive.
    params: Optional[Callable[..., Mapping[str, Tensor]]] = None
    param_options: tuple[str, ...] = ()
    # Methods that reduce only at some blocks (ATC, FPET): (num_layers, options) -> block indices;
    # the schedule spreads r over those blocks only (tomec.schedule.resolve(blocks=...)).
    reduction_blocks: Optional[Callable[[int, Mapping[str, Any]], Optional[list[int]]]] = None
    # The step also runs at blocks whose schedule entry is 0: it still reorders the tokens (LTMP's
    # official inference rebuilds every block's sequence as A then B), which changes later splits.
    reorders_at_r0: bool = False

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

    def site_of(self, options: Mapping[str, Any]) -> str:
        """Where the merge sits with these (checked) options: "attention", "block" or "ahead"."""
        return "ahead" if self.ahead_option is not None and options.get(self.ahead_option) else self.site

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
    attn_in: Optional[Tensor] = None,
    params: Optional[Mapping[str, Tensor]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One block's merge: match, merge with sizes, compose the source map.

    Args:
        x: ``[B, N, C]`` the tokens after the attention residual.
        size: ``[B, N, 1]`` sizes entering the block (None: all ones).
        source: ``[B, N0]`` source map so far (None: identity), used when ``trace_source``.
        keys, queries: ``[B, H, N, d]`` of the block's attention.
        attn_in: ``[B, N, C]`` the tokens entering the attention projections (methods that ask).
        params: the block's learned tensors (``Method.params``), for methods that have them.

    Returns:
        ``x [B, N - r, C]``, ``size [B, N - r, 1]``, ``source [B, N0]`` (None without tracing).
    """
    dest, w, merge_size, plan = _match(
        x, size, keys, queries, method=method, r=r, protected=protected, layer=layer,
        num_layers=num_layers, scale=scale, prop_attn=prop_attn, impl=impl, options=options,
        attn_in=attn_in, params=params,
    )
    return _merge(x, source, dest, w, merge_size, plan, r, trace_source, impl)


def _merge(x, source, dest, w, merge_size, plan, r, trace_source, impl):
    """The shared merge (sizes summed) and the source map composed."""
    x, size = ops.merge(
        x, merge_size, dest, x.shape[1] - r, w, n_dropped=plan.n_dropped, mode=plan.mode, impl=impl
    )
    if trace_source:
        source = ops.compose_source(source, dest, impl=impl)
    return x, size, source


def _match(x, size, keys, queries, *, method, r, protected, layer, num_layers, scale, prop_attn, impl,
           options, attn_in, params):
    """The matcher's ``(dest, w, sizes to sum, LayerMerge)`` for one block."""
    spec = get(method)
    options = {k: v for k, v in (options or {}).items() if k not in spec.param_options}
    plan = spec.layer_merge(layer, num_layers, r, options)
    available_inputs = {"x": x, "q": queries, "size": size, "scale": scale, "prop_attn": prop_attn,
                        "attn_in": attn_in}
    extra = {name: available_inputs[name] for name in spec.inputs}
    found = spec.match(
        keys, r, protected, layer=layer, num_layers=num_layers, impl=impl, **extra,
        **dict(params or {}), **options
    )
    dest, w, merge_size = found if spec.returns_weights else (found, None, size)
    return dest, w, merge_size, plan


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
    options: Optional[Mapping[str, Any]] = None,
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
    dest, w, merge_size, plan = _match(
        x, size, keys, queries, method=method, r=r, protected=protected, layer=layer,
        num_layers=num_layers, scale=scale, prop_attn=prop_attn, impl=impl, options=options,
        attn_in=None, params=None,
    )
    probs = ops.attention_probs(queries, keys, size if prop_attn else None, scale)
    merged_probs = ops.merge_attention(probs, dest, merge_size if w is None else w, x.shape[1] - r,
                                       plan.n_dropped)
    return (*_merge(x, source, dest, w, merge_size, plan, r, trace_source, impl), merged_probs)


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


def tofu_prunes(layer: int, num_layers: int, prune_blocks: Optional[int] = None) -> bool:
    """Whether ToFu's block ``layer`` prunes (else it merges norm-preservingly).

    ``prune_blocks=None`` is the public code's rule (PiToMe's ToFu port and the OpenToMe toolbox
    merge when ``layer > L // 2``): blocks ``0 .. L // 2``, i.e. ``L // 2 + 1`` of them (7 of 12).
    The paper states the principle (prune early, where the model is not linear in its inputs) but,
    as far as we could read it, no block index; ``prune_blocks=k`` prunes blocks ``0 .. k - 1``
    (``L // 2``: exactly the first half, tomec's rule before 0.2).
    """
    first_merging = num_layers // 2 + 1 if prune_blocks is None else prune_blocks
    return layer < first_merging


def _tofu_match(keys, r, protected, *, layer, num_layers, impl="torch", prune_blocks=None):
    drop = tofu_prunes(layer, num_layers, prune_blocks)
    return ops.bipartite_match(keys, r, protected, drop_sources=drop, impl=impl)


def _check_tofu(options: dict[str, Any]) -> dict[str, Any]:
    k = options["prune_blocks"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0):
        raise ConfigError(
            f"tofu: prune_blocks must be a block count >= 0 or None (blocks 0 .. L//2 prune, as the "
            f"public code), got {k!r}"
        )
    return options


register(
    Method(
        name="tofu",
        summary="ToFu (WACV'24): ToMe's matching; early blocks prune, later ones merge norm-preservingly",
        match=_tofu_match,
        options={"prune_blocks": None},
        check=_check_tofu,
        layer_merge=lambda layer, num_layers, r, options: (
            LayerMerge(r, n_dropped=r) if tofu_prunes(layer, num_layers, options.get("prune_blocks"))
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


def read_json_option(value: Any, method: str, what: str) -> Any:
    """An option given as a path to a JSON file is read (errors name the file); others pass through."""
    if not isinstance(value, (str, Path)):
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{method}: {what} file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{method}: {path} is not JSON: {e}") from e



def load_diffrate_kept(kept: Any) -> dict[str, list[int]]:
    """A searched DiffRate schedule: ``{"prune_kept": [...], "merge_kept": [...]}`` (tokens kept per
    block after pruning and after merging, protected tokens included), or a path to such JSON."""
    kept = read_json_option(kept, "diffrate", "kept schedule")
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


class DiffRateKeptWarning(UserWarning):
    """A DiffRate kept count that does nothing where it stands (above the tokens reaching its step)."""


def _diffrate_plan(kept: Mapping[str, list[int]], num_layers: int, num_tokens: int, protected: int):
    """Per-block (removed, pruned) from kept counts, as DiffRate's original evaluates them: block
    ``l`` keeps ``min(n, prune_kept[l])`` of the ``n`` tokens it receives, then
    ``min(that, merge_kept[l])``.

    A count above the tokens the model has, or one that keeps no more than the protected tokens, is
    an error naming the block. A count above the tokens that reach its step (a prune count above
    the block's input, a merge count above what the pruning left: counts that rise along the depth
    or a merge count above its block's prune count) does nothing there; the original clamps it the
    same way and its published schedules have such counts, so it is allowed, with a warning that
    names the blocks.
    """
    if len(kept["merge_kept"]) != num_layers:
        raise ScheduleError(
            f"diffrate: the kept schedule has {len(kept['merge_kept'])} entries but the model has "
            f"{num_layers} attention blocks"
        )
    plan, n, idle = [], num_tokens, []
    for layer, (pk, mk) in enumerate(zip(kept["prune_kept"], kept["merge_kept"])):
        for name, count in (("prune_kept", pk), ("merge_kept", mk)):
            if count > num_tokens:
                raise ScheduleError(
                    f"diffrate: {name}[{layer}]={count} is more than the {num_tokens} tokens the "
                    f"model has (kept counts include the {protected} protected)"
                )
            if count <= protected:
                raise ScheduleError(
                    f"diffrate: {name}[{layer}]={count} keeps no more than the {protected} protected "
                    f"tokens; block {layer} must keep at least {protected + 1}"
                )
        if pk > n:
            idle.append(f"block {layer} prunes nothing (prune_kept {pk}, {n} tokens enter)")
        pruned = min(pk, n)
        if mk > pruned:
            idle.append(f"block {layer} merges nothing (merge_kept {mk}, {pruned} tokens after pruning)")
        out = min(mk, pruned)
        plan.append((n - out, n - pruned))
        n = out
    if idle:
        warnings.warn(
            f"diffrate: kept counts above the tokens that reach their step do nothing there "
            f"(DiffRate's original clamps them the same way): {'; '.join(idle)}",
            DiffRateKeptWarning,
            stacklevel=3,
        )
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


# --- CrossGET -----------------------------------------------------------------------------------



def _crossget_match(keys, r, protected, *, layer, num_layers, q, x, size, impl="torch", guided=True):
    return ops.crossget_match(keys, q, r, protected, x=x, size=size, guided=guided, impl=impl)


def _check_crossget(options: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(options["guided"], bool):
        raise ConfigError(f"crossget: guided must be True or False, got {options['guided']!r}")
    return options


register(
    Method(
        name="crossget",
        summary="CrossGET (ICML'24), vision-only: complete-graph matching guided by the CLS query, "
        "importance-weighted ensembles",
        match=_crossget_match,
        inputs=("q", "x", "size"),
        returns_weights=True,
        cap=tome_cap,  # the official reducer clamps r to half of the mergeable tokens
        options={"guided": True},
        check=_check_crossget,
        training="no: off the shelf (the original's learned cross token is not used)",
    )
)


# --- MCTF ---------------------------------------------------------------------------------------



def _mctf_match(keys, r, protected, *, layer, num_layers, x, q, size, scale, prop_attn, impl="torch",
                tau_sim=1.0, tau_info=20.0, tau_size=40.0, bidirectional=True, one_step_ahead=True):
    return ops.mctf_match(
        x, q, keys, size, r, protected, tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size,
        bidirectional=bidirectional, scale=scale, prop_attn=prop_attn, impl=impl,
    )


MCTF_FLOOR = 10  # the official merge never leaves fewer tokens than this (CLS included)


def mctf_cap(num_tokens: int, num_protected: int) -> int:
    """MCTF's per-block cap, as its official merge clamps ``r``: ToMe's half of the mergeable tokens,
    and at least ``MCTF_FLOOR`` tokens left."""
    return max(min(tome_cap(num_tokens, num_protected), num_tokens - MCTF_FLOOR), 0)


def _mctf_blocks(num_layers: int, options: Mapping[str, Any]) -> Optional[list[int]]:
    """One step ahead, block 0 is left alone (the official DeiT setting: ``--activate_layer 1..11``):
    its merge would act on the patch embedding."""
    return list(range(1, num_layers)) if options["one_step_ahead"] and num_layers > 1 else None


def _check_mctf(options: dict[str, Any]) -> dict[str, Any]:
    for name in ("tau_sim", "tau_info", "tau_size"):
        tau = options[name]
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 <= tau < math.inf:
            raise ConfigError(f"mctf: {name} must be a finite number >= 0 (0 disables it), got {tau!r}")
        options[name] = float(tau)
    for name in ("bidirectional", "one_step_ahead"):
        if not isinstance(options[name], bool):
            raise ConfigError(f"mctf: {name} must be True or False, got {options[name]!r}")
    return options


register(
    Method(
        name="mctf",
        summary="MCTF (CVPR'24): bidirectional bipartite matching scored by similarity, "
        "informativeness and size; attention-weighted merge, one step ahead",
        match=_mctf_match,
        inputs=("x", "q", "size", "scale", "prop_attn"),
        returns_weights=True,
        # ToMe's cap, (N - P) // 2, and the floor of 10 tokens, which the official code clamps every
        # block's r to. Bidirectional, the ceil(r/2) B sources still fit among the non-protected B
        # tokens with a non-protected A token left to receive them; bidirectional matching alone
        # could remove more, but neither the official code nor a cap that cannot see the options
        # allows it.
        cap=mctf_cap,
        options={"tau_sim": 1.0, "tau_info": 20.0, "tau_size": 40.0, "bidirectional": True,
                 "one_step_ahead": True},
        check=_check_mctf,
        # the official one_step_ahead=1 (its DeiT setting): merge at the block's input with the
        # block's own attention, which then runs merged; False: after the attention residual
        ahead_option="one_step_ahead",
        reduction_blocks=_mctf_blocks,
        training="off the shelf (the paper also fine-tunes with token-reduction consistency; not here)",
    )
)


# --- LTMP ---------------------------------------------------------------------------------------


def _load_ltmp_pair(value: Any, what: str, kind: type) -> dict[str, list]:
    """``{"merge": [...], "prune": [...]}`` per block (other keys, e.g. provenance, are kept out),
    or a path to such JSON (as ``tomec calibrate`` / the threshold training write)."""
    value = read_json_option(value, "ltmp", what)
    if not isinstance(value, Mapping) or not {"merge", "prune"} <= set(value):
        raise ConfigError(
            f"ltmp: {what} must map 'merge' and 'prune' to per-block lists, got {value!r}"
        )
    out = {}
    for name in ("merge", "prune"):
        values = value[name]
        ok = isinstance(values, (list, tuple)) and all(
            isinstance(v, kind) and not isinstance(v, bool) and (kind is numbers.Real or v >= 0)
            for v in values
        )
        if not ok:
            must = "non-negative ints" if kind is numbers.Integral else "numbers"
            raise ConfigError(f"ltmp: {what}['{name}'] must be a list of {must}, got {values!r}")
        out[name] = [int(v) if kind is numbers.Integral else float(v) for v in values]
    if len(out["merge"]) != len(out["prune"]):
        raise ConfigError(
            f"ltmp: {what} has {len(out['merge'])} merge entries and {len(out['prune'])} prune entries"
        )
    return out


def load_ltmp_counts(counts: Any) -> dict[str, list[int]]:
    """A calibrated LTMP schedule: tokens merged and pruned per block, or a path to its JSON."""
    return _load_ltmp_pair(counts, "counts", numbers.Integral)


def load_ltmp_thresholds(thresholds: Any) -> dict[str, list[float]]:
    """LTMP thresholds per block (``merge``: cosine score, ``prune``: mean attention received)."""
    return _load_ltmp_pair(thresholds, "thresholds", numbers.Real)


def _ltmp_schedule(options, num_layers, num_tokens, protected):
    counts = options["counts"]
    if len(counts["merge"]) != num_layers:
        raise ScheduleError(
            f"ltmp: the counts have {len(counts['merge'])} entries but the model has {num_layers} "
            f"attention blocks"
        )
    out, n = [], num_tokens
    for layer, (m, p) in enumerate(zip(counts["merge"], counts["prune"])):
        merge_cap = (n - protected) // 2
        if m > merge_cap:
            raise ScheduleError(
                f"ltmp: block {layer} merges {m} of {n} tokens ({protected} protected); at most "
                f"{merge_cap}"
            )
        prune_cap = ops.ltmp_prune_cap(n, protected, m)
        if p > prune_cap:
            raise ScheduleError(
                f"ltmp: block {layer} prunes {p} of {n} tokens after merging {m} ({protected} "
                f"protected); at most {prune_cap}"
            )
        out.append(m + p)
        n -= m + p
    return out


def _ltmp_pruned(layer: int, r: int, options: Mapping[str, Any]) -> int:
    counts = options.get("counts")
    return counts["prune"][layer] if counts is not None and r > 0 else 0


def _ltmp_match(keys, r, protected, *, layer, num_layers, q, size, scale, prop_attn, impl="torch",
                counts=None, thresholds=None):
    n_prune = _ltmp_pruned(layer, r, {"counts": counts})
    return ops.ltmp_match(
        keys, q, size, r - n_prune, n_prune, protected, scale=scale, prop_attn=prop_attn, impl=impl
    )


def _check_ltmp(options: dict[str, Any]) -> dict[str, Any]:
    if options["thresholds"] is not None:
        load_ltmp_thresholds(options["thresholds"])  # malformed thresholds get their own error first
        if options["counts"] is None:
            raise ConfigError(
                "ltmp: thresholds pick a different number of tokens per image, which a compiled "
                "graph cannot; turn them into static per-block counts with `tomec calibrate "
                "--model ... --thresholds <json> --out counts.json` (or tomec.calibrate.calibrate) "
                "and pass counts='counts.json'"
            )
        raise ConfigError(
            "ltmp: give counts= only; thresholds= next to counts= would be ignored (the calibrated "
            "counts already came from thresholds; `tomec calibrate` records them in its JSON)"
        )
    if options["counts"] is not None:
        options["counts"] = load_ltmp_counts(options["counts"])
    else:
        msg = ("ltmp: no counts= given, so nothing is pruned and LTMP is ToMe's merging with the r / "
               "schedule= counts; learn thresholds (tomec.calibrate.train_thresholds) and turn them "
               "into counts with `tomec calibrate`")
        warnings.warn(msg, stacklevel=4)
        logging.getLogger("tomec").warning(msg)
    return options


register(
    Method(
        name="ltmp",
        summary="LTMP (TMLR'23): ToMe's merge, then prune by attention received; calibrated counts",
        match=_ltmp_match,
        inputs=("q", "size", "scale", "prop_attn"),
        options={"counts": None, "thresholds": None},
        check=_check_ltmp,
        schedule=_ltmp_schedule,
        schedule_option="counts",
        reorders_at_r0=True,
        layer_merge=lambda layer, num_layers, r, options: LayerMerge(
            r, n_dropped=_ltmp_pruned(layer, r, options)
        ),
        training="thresholds learned with frozen weights (tomec.calibrate.train_thresholds), "
        "then calibrated to static counts (counts= option, `tomec calibrate`)",
    )
)


# --- ATC ----------------------------------------------------------------------------------------



def atc_cap(num_tokens: int, num_protected: int) -> int:
    """ATC's per-block cap: all but one of the mergeable tokens (at least one cluster remains)."""
    return max(num_tokens - num_protected - 1, 0)


def _atc_blocks(num_layers: int, options: Mapping[str, Any]) -> list[int]:
    blocks = options["blocks"]
    return ops.atc_default_blocks(num_layers) if blocks is None else list(blocks)


def _atc_match(keys, r, protected, *, layer, num_layers, impl="torch", blocks=None,
               linkage="average", keep_rate=None):
    return ops.atc_match(keys, r, protected, linkage=linkage, impl=impl)


def _atc_schedule(options, num_layers, num_tokens, protected):
    blocks = check_blocks(_atc_blocks(num_layers, options), num_layers, "atc: blocks")
    return ops.atc_keep_rate_schedule(blocks, num_layers, num_tokens, protected, options["keep_rate"])


def _check_atc(options: dict[str, Any]) -> dict[str, Any]:
    if options["blocks"] is not None:  # the depth is checked when the schedule is resolved
        options["blocks"] = check_blocks(options["blocks"], None, "atc: blocks")
    if options["linkage"] not in ops.LINKAGES:
        raise ConfigError(
            f"atc: linkage must be one of {', '.join(ops.LINKAGES)}, got {options['linkage']!r}"
        )
    rho = options["keep_rate"]
    if rho is not None:
        if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 < rho <= 1:
            raise ConfigError(f"atc: keep_rate must be a number in (0, 1], got {rho!r}")
        options["keep_rate"] = float(rho)
    return options


register(
    Method(
        name="atc",
        summary="ATC (ECCV'24): agglomerative clustering (average, complete or single linkage) at a "
        "few reduction blocks",
        match=_atc_match,
        cap=atc_cap,
        options={"blocks": None, "linkage": "average", "keep_rate": None},
        check=_check_atc,
        schedule=_atc_schedule,
        schedule_option="keep_rate",
        reduction_blocks=_atc_blocks,
        training="no: off the shelf (the merge is differentiable in the tokens; the clustering is not)",
    )
)


# --- FPET ---------------------------------------------------------------------------------------



def _fpet_blocks(num_layers: int, options: Mapping[str, Any]) -> list[int]:
    block = options["block"]
    return [num_layers // 2 if block is None else block]


def _fpet_match(keys, r, protected, *, layer, num_layers, size, x, impl="torch", block=None,
                down=None, up=None):
    return ops.fpet_match(keys, r, protected, size=size, down=down, up=up, x=x, impl=impl)


def _fpet_params(options, *, layer, num_layers, channels, head_dim):
    weights = options["adapter"]
    if weights is None:
        return {}
    if weights["down"].shape[1] != head_dim:
        raise ConfigError(
            f"fpet: the adapter takes {weights['down'].shape[1]}-wide keys, the model's attention "
            f"heads are {head_dim} wide"
        )
    return dict(weights)


def _check_fpet(options: dict[str, Any]) -> dict[str, Any]:
    from .fpet import check_adapter

    block = options["block"]
    if block is not None and (isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 0):
        raise ConfigError(f"fpet: block must be a block index >= 0 or None (the middle one), got {block!r}")
    return {**options, "adapter": check_adapter(options["adapter"])}


register(
    Method(
        name="fpet",
        summary="FPET (CVPR'25): one checkerboard merge on the patch grid at one block, on the keys "
        "refined by a learned 1-bit adapter",
        match=_fpet_match,
        inputs=("size", "x"),
        returns_weights=True,
        cap=ops.fpet_cap,
        options={"block": None, "adapter": None},
        check=_check_fpet,
        params=_fpet_params,
        param_options=("adapter",),
        reduction_blocks=_fpet_blocks,
        training="the refinement adapter, backbone frozen (tomec.fpet.train_adapter, the official "
        "straight-through rule); without adapter= the metric is the keys alone",
    )
)


# --- DTEM ---------------------------------------------------------------------------------------



def _dtem_match(keys, r, protected, *, layer, num_layers, attn_in, weight, bias, impl="torch"):
    return ops.dtem_match(attn_in, weight, bias, r, protected, impl=impl)


def _dtem_params(options, *, layer, num_layers, channels, head_dim):
    from .dtem import block_params

    return block_params(options["heads"], seed=options["seed"], dim=options["dim"], layer=layer,
                        num_layers=num_layers, channels=channels, head_dim=head_dim)


def _check_dtem(options: dict[str, Any]) -> dict[str, Any]:
    from .dtem import RANDOM_HEADS_WARNING, load_heads

    seed, dim = options["seed"], options["dim"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"dtem: seed must be an int >= 0, got {seed!r}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1):
        raise ConfigError(f"dtem: dim must be a positive int or None (the head width rule), got {dim!r}")
    heads = load_heads(options["heads"])
    if heads is not None and dim is not None and dim != heads.layers[0][0].shape[0]:
        raise ConfigError(f"dtem: dim={dim} but the given heads are {heads.layers[0][0].shape[0]} wide")
    if heads is None:
        msg = RANDOM_HEADS_WARNING.format(seed=seed)
        warnings.warn(msg, stacklevel=4)
        logging.getLogger("tomec").warning(msg)
    return {**options, "heads": heads, "seed": int(seed), "dim": dim}


register(
    Method(
        name="dtem",
        summary="DTEM (NeurIPS'24): ToMe's matching on a learned per-block embedding of the tokens",
        match=_dtem_match,
        inputs=("attn_in",),
        options={"heads": None, "seed": 0, "dim": None},
        check=_check_dtem,
        params=_dtem_params,
        param_options=("heads", "seed", "dim"),
        training="yes: soft merging trains the heads, backbone frozen (tomec.dtem.train_heads); "
        "without heads= it is ToMe with a random metric",
    )
)
