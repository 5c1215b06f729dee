"""DiffRate (ICCV'23): prune and merge by the CLS token's attention, with searched kept counts.

A block keeps ``prune_kept[l]`` of its tokens after pruning the least important (the CLS query's
attention), then ``merge_kept[l]`` after merging the next least important into their most similar
kept token (METHODS.md, DiffRate; OpenGVLab/DiffRate). Without ``kept=`` it merges only, by ``r``.
The search that finds the counts: :mod:`tomec.train.diffrate`.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from tomec.errors import ConfigError, ScheduleError
from tomec.files import read_json_option
from tomec.ops.attention import log_size_bias
from tomec.ops.bipartite import cosine
from tomec.ops.common import check_dtype, descending_rank, resolve_impl

from .core import LayerMerge, MatchInput, MatchResult, Method, Options, register

__all__ = ["DiffrateOptions", "DiffRateKeptWarning", "diffrate_match", "load_diffrate_kept"]


def diffrate_match(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    size: Optional[Tensor],
    r: int,
    protected: int,
    *,
    n_dropped: int = 0,
    scale: Optional[float] = None,
    prop_attn: bool = True,
    impl: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    """DiffRate's prune-then-merge (METHODS.md, DiffRate; OpenGVLab/DiffRate's merge weighting).

    Importance of each token is the CLS query's attention to it, averaged over heads (one ``1 × N``
    softmax per head, with the ``log(size)`` bias under ``prop_attn``, as the block's attention). Non-protected tokens are
    sorted by importance (descending, ties to the lower index); the last ``n_dropped`` are pruned,
    and the next least important ``r - n_dropped`` merge into their most cosine-similar token (on
    ``x``) among the ``T - r`` most important ones. As in the official code a merged token is the
    plain mean of its members (``w`` = 1) and its size is ``size_dst + Σ size_src · sim`` with no
    clamp, as the official evaluation path (its search/training branch clamps each term at 1,
    which with ``sim <= 1`` undoes the scaling; ``tomec.train.diffrate`` keeps that clamp). One
    guard the original lacks: a source with ``sim < 0`` adds 0, never a negative size (which
    could make a merged size <= 0 and its ``log`` NaN under proportional attention).

    Args:
        x: ``[B, N, C]`` the block's tokens; q, k: ``[B, H, N, d]``; size: ``[B, N, 1]`` or None
            (all ones). scale: the attention's logit scale (``d ** -0.5`` when None).
        r: tokens removed (pruned plus merged); protected: leading tokens (the first is the CLS).

    Returns:
        ``dest [B, N]`` (``-1`` for pruned), ``w [B, N, 1]`` merge weights, ``size [B, N, 1]`` the
        sizes to sum (sources scaled by their similarity).
    """
    check_dtype(x.dtype, "merged tokens")
    batch, n, _ = x.shape
    if protected < 1:
        raise ConfigError("DiffRate ranks tokens by the CLS token's attention: it needs protect >= 1")
    t = n - protected
    if not 0 <= n_dropped <= r <= t - 1:
        raise ConfigError(
            f"DiffRate: r={r} (n_dropped={n_dropped}) must satisfy 0 <= n_dropped <= r <= {t - 1} "
            f"for {n} tokens with {protected} protected"
        )
    resolve_impl(impl, x.device)  # validates; the importance and matching stay PyTorch (fused by Inductor)
    device = x.device
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = (q[:, :, :1].to(wide) * scale) @ k.to(wide).transpose(-1, -2)  # [B, H, 1, N]
    if prop_attn and size is not None:
        logits = logits + log_size_bias(size.to(wide), wide)
    importance = logits.softmax(dim=-1).mean(dim=1)[:, 0, protected:]  # [B, T]
    rank = descending_rank(importance)
    order = rank.argsort(dim=-1)
    n_keep, n_src = t - r, r - n_dropped
    xs = x[:, protected:].to(wide)
    pick = lambda idx: xs.gather(1, idx.unsqueeze(-1).expand(batch, idx.shape[1], xs.shape[-1]))  # noqa: E731
    best, partner = cosine(pick(order[:, n_keep : n_keep + n_src]), pick(order[:, :n_keep])).max(-1)
    slot_at = torch.cat(
        [
            protected + torch.arange(n_keep, device=device).expand(batch, n_keep),
            protected + partner,
            torch.full((batch, n_dropped), -1, device=device, dtype=torch.int64),
        ],
        dim=1,
    )
    similarity_at = torch.cat(
        [torch.ones(batch, n_keep, device=device, dtype=wide), best,
         torch.ones(batch, n_dropped, device=device, dtype=wide)], dim=1
    )
    head = torch.arange(protected, device=device).expand(batch, protected)
    dest = torch.cat([head, slot_at.gather(1, rank)], dim=1)
    scale_size = torch.cat(
        [torch.ones(batch, protected, device=device, dtype=wide), similarity_at.gather(1, rank)], 1
    )
    sizes = x.new_ones(batch, n, 1) if size is None else size
    return dest, x.new_ones(batch, n, 1), (sizes * scale_size.clamp_min(0).unsqueeze(-1)).to(x.dtype)


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


def _schedule(options: "DiffrateOptions", num_layers: int, num_tokens: int, protected: int) -> list[int]:
    return [r for r, _ in _diffrate_plan(options.kept, num_layers, num_tokens, protected)]


def _layer_merge(options: "DiffrateOptions", layer: int, num_layers: int, r: int) -> LayerMerge:
    if options.kept is None:
        return LayerMerge(r)  # off the shelf: merging only
    if r == 0:
        return LayerMerge(0)
    pk, mk = options.kept["prune_kept"][layer], options.kept["merge_kept"][layer]
    n_in = r + min(mk, pk)  # the block keeps min(mk, pk) of its tokens when it removes any
    return LayerMerge(r, n_dropped=max(n_in - pk, 0))


@dataclass(frozen=True)
class DiffrateOptions(Options):
    """``kept``: a searched schedule ``{"prune_kept": [...], "merge_kept": [...]}`` (or its JSON
    path); None: merging only, by ``r`` / ``schedule=``."""

    method = "diffrate"
    schedule_field = "kept"
    kept: Optional[Mapping[str, list[int]]] = None

    def __post_init__(self) -> None:
        if self.kept is not None:
            self._set("kept", load_diffrate_kept(self.kept))


def _match(inp: MatchInput, options: DiffrateOptions) -> MatchResult:
    dest, w, sizes = diffrate_match(inp.x, inp.queries, inp.keys, inp.size, inp.r, inp.protected,
                                    n_dropped=inp.n_dropped, scale=inp.scale, prop_attn=inp.prop_attn,
                                    impl=inp.impl)
    return MatchResult(dest, w, sizes)


register(Method(name="diffrate", options=DiffrateOptions, match=_match, schedule=_schedule,
                layer_merge=_layer_merge))
