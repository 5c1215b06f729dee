"""Step 6: average pooling over tokens becomes a size-weighted mean.

A merged token stands for several patches; an unweighted mean over the final tokens would count it
once. Every ``mean(dim=1)`` over the final token stream (optionally after dropping the prefix tokens
with ``x[:, P:]``) is replaced by :func:`tomec.ops.size_weighted_mean` with the matching sizes.
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

from torch.fx import GraphModule, Node

from tomec import ops

from . import graph_utils as gu

log = logging.getLogger("tomec.passes")


def _token_slice_start(node: Node) -> Optional[int]:
    """``x[:, s:]`` → ``s``; anything else → None."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    index = node.args[1]
    if not (isinstance(index, tuple) and len(index) == 2):
        return None
    batch, tokens = index
    if batch != slice(None) or not isinstance(tokens, slice):
        return None
    if tokens.stop is not None or tokens.step not in (None, 1):
        return None
    start = tokens.start or 0
    return start if isinstance(start, int) and start >= 0 else None


def _mean_over_tokens(node: Node) -> Optional[tuple[Node, bool]]:
    if not gu.is_mean(node):
        return None
    dim = gu.arg(node, 1, "dim")
    keepdim = gu.arg(node, 2, "keepdim", False)
    if dim not in (1, (1,), [1]) or gu.arg(node, 3, "dtype") is not None:
        return None
    src = node.args[0]
    return (src, bool(keepdim)) if isinstance(src, Node) else None


def _stream_means(gm: GraphModule, num_tokens: int, within: Optional[set] = None) -> list[tuple[Node, Node, int, bool]]:
    """``(mean, its input, token slice start, keepdim)`` for every ``mean(dim=1)`` over a
    ``[B, num_tokens, C]`` stream (optionally ``x[:, P:]`` of it) in ``gm`` (among ``within``)."""
    out = []
    for node in gm.graph.nodes:
        found = None if within is not None and node not in within else _mean_over_tokens(node)
        if found is None:
            continue
        src, keepdim = found
        start = _token_slice_start(src)
        stream = src.args[0] if start is not None else src
        shape = gu.meta_shape(stream, original=True)
        if shape is not None and len(shape) == 3 and shape[1] == num_tokens:
            out.append((node, src, start or 0, keepdim))
    return out


def weight_token_means(gm: GraphModule, last_merge: Node, size: Node, num_tokens: int) -> list[str]:
    """Replace the token means downstream of the last merge; returns what was replaced.

    ``size``: the sizes after the last merge; ``num_tokens``: the token count Dynamo traced (before
    merging), used to recognize the token stream.
    """
    graph = gm.graph
    replaced = []
    for node, src, start, keepdim in _stream_means(gm, num_tokens, gu.descendants(last_merge)):
        with graph.inserting_before(node):
            sizes = size
            if start:
                sizes = graph.call_function(operator.getitem, (size, (slice(None), slice(start, None))))
            mean = graph.call_function(ops.size_weighted_mean, (src, sizes))
            if keepdim:
                mean = graph.call_method("unsqueeze", (mean, 1))
        node.replace_all_uses_with(mean)
        graph.erase_node(node)
        replaced.append(f"{node.name} (mean over tokens {start}:) -> size-weighted mean")
        log.info("tomec: pooling %s", replaced[-1])
    return replaced


def token_means(gm: GraphModule, num_tokens: int) -> list[str]:
    """The means over a ``[B, num_tokens, C]`` stream in ``gm`` (a head graph after a break, whose
    sizes are in another graph): what would be size-weighted had it been one graph."""
    return [node.name for node, *_ in _stream_means(gm, num_tokens)]
