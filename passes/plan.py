"""Step 2: plan the rewrite: protected tokens, token counts, the resolved schedule, early errors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

from tomec.config import TomecConfig
from tomec.errors import UnsupportedModelError
from tomec.ops import check_dtype

from . import graph_utils as gu
from .blocks import AttentionBlock

log = logging.getLogger("tomec.passes")

_PREFIX_SEARCH_DEPTH = 12


@dataclass
class Plan:
    blocks: list[AttentionBlock]
    protected: int
    protected_how: str
    schedule: list[int]
    tokens_in: list[int]  # tokens entering each block after the rewrite

    @property
    def num_tokens(self) -> int:
        return self.tokens_in[0]

    @property
    def tokens_out(self) -> int:
        return self.tokens_in[-1] - self.schedule[-1]


def _is_data_input(node: Node) -> bool:
    """A tensor the caller passes in (the images), not a parameter, buffer or symbolic size."""
    if node.op != "placeholder":
        return False
    value = gu.original_value(node)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
        return False
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    source = source() if callable(source) else str(source)
    return "._buffers[" not in source and "._parameters[" not in source


def _concat_dim(node: Node) -> Optional[int]:
    if not gu.is_call(node, {torch.cat, torch.concat, torch.concatenate}):
        return None
    dim = gu.arg(node, 1, "dim", 0)
    return dim if isinstance(dim, int) else None


def count_prefix_tokens(stream: Node) -> tuple[int, str]:
    """Prefix tokens from the ``cat(dim=1)`` of parameter tokens before the first block.

    Returns the count and how it was found (for the report); 0 when there is no such ``cat``.
    """
    frontier, seen = [stream], set()
    for _ in range(_PREFIX_SEARCH_DEPTH):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if _concat_dim(n) in (1, -2):  # the token axis of [B, N, C]
                parts = n.args[0] if n.args else n.kwargs.get("tensors")
                if not isinstance(parts, (list, tuple)) or len(parts) < 2:
                    continue
                *prefix, patches = parts
                data = {a for a in gu.ancestors(patches) if _is_data_input(a)}
                if any(data & gu.ancestors(p) or p in data for p in prefix):
                    continue  # a concat of image-derived tensors, not parameter tokens
                count = sum(int(gu.meta_shape(p, True)[1]) for p in prefix)
                return count, f"{count} prefix tokens concatenated before the first block ({n.name})"
            nxt.extend(a for a in n.all_input_nodes if not _is_data_input(a))
        frontier = nxt
    return 0, "no prefix-token concat before the first block"


def make_plan(
    blocks: list[AttentionBlock],
    config: TomecConfig,
    starts_after_break: Optional[str] = None,
    model_prefix_tokens: Optional[int] = None,
) -> Plan:
    """Resolve protected tokens and the schedule for the found blocks; raise early on bad input.

    ``starts_after_break``: the graph continues the model after this graph break, so prefix tokens
    concatenated before it are out of sight; ``model_prefix_tokens`` (timm's ``num_prefix_tokens``)
    then counts them, and without it ``protect="auto"`` is an error rather than a guess of 0."""
    first = blocks[0]
    for b in blocks:
        check_dtype(b.dtype, f"the attention keys of block {b.index} ({b.path})")
    counts = {b.num_tokens for b in blocks}
    if len(counts) != 1:
        detail = ", ".join(f"{b.path}: {b.num_tokens}" for b in blocks)
        raise UnsupportedModelError(
            f"the attention blocks see different token counts before merging ({detail}); tomec "
            f"merges along one token sequence that every block shares"
        )
    if config.protect == "auto":
        protected, how = count_prefix_tokens(first.stream)
        if protected == 0 and starts_after_break:
            if model_prefix_tokens is None:
                raise UnsupportedModelError(
                    f"the graph with the attention blocks starts after a graph break "
                    f"({starts_after_break}), so tomec cannot see the CLS/register tokens "
                    f"concatenated before the blocks; pass protect=<their count> (0 if the model has "
                    f"none) or remove the break"
                )
            protected = model_prefix_tokens
            how = (f"{protected} prefix tokens from the model's num_prefix_tokens (the graph starts "
                   f"after a graph break: {starts_after_break})")
    else:
        protected, how = int(config.protect), "protect= given"
    if protected >= first.num_tokens:
        raise UnsupportedModelError(
            f"{protected} protected tokens but only {first.num_tokens} tokens enter the first block"
        )
    schedule = config.resolve_schedule(len(blocks), first.num_tokens, protected)
    tokens_in, n = [], first.num_tokens
    for r in schedule:
        tokens_in.append(n)
        n -= r
    log.info(
        "tomec: %d attention blocks, %d tokens, %d protected (%s); schedule %s",
        len(blocks), first.num_tokens, protected, how, schedule,
    )
    return Plan(blocks, protected, how, schedule, tokens_in)
