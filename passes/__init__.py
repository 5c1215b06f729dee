"""FX graph passes: find attention blocks, plan, insert merges, fix shapes, weight pooling, validate.

:func:`rewrite` runs the whole pipeline on a Dynamo FX graph (torch-level ops, before AOTAutograd)
and returns the rewritten graph with a report of what changed and what was skipped.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch.fx import GraphModule, Node

from tomec.config import TomecConfig
from tomec.errors import UnsupportedModelError

from . import graph_utils as gu
from .decompose import decompose_attention_calls
from .blocks import AttentionBlock, FoundBlocks, Skipped, find_blocks
from .insert import Inserted, erase_replaced, insert_merges
from .plan import Plan, make_plan
from .pooling import weight_token_means
from .shapes import fix_shapes, validate

__all__ = ["rewrite", "RewriteResult", "PassReport", "find_blocks", "AttentionBlock", "Plan"]

log = logging.getLogger("tomec.passes")

LOOKED_FOR = (
    "an SDPA call or a softmax(q @ kᵀ) @ v chain, whose keys come from a residual stream that the "
    "attention output is added back to"
)


@dataclass
class PassReport:
    """What one run of the pipeline did to one graph."""

    graph_nodes: int
    blocks: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    schedule: Optional[list[int]] = None
    protected: Optional[int] = None
    shape_literals: int = 0

    def text(self) -> str:
        lines = [f"graph with {self.graph_nodes} nodes"]
        if self.schedule is not None:
            lines.append(f"  protected tokens: {self.protected}; schedule: {self.schedule}")
        lines += [f"  {b}" for b in self.blocks]
        lines += [f"  skipped {s}" for s in self.skipped]
        lines += [f"  {n}" for n in self.notes]
        if self.shape_literals:
            lines.append(f"  rewrote {self.shape_literals} shape literals")
        return "\n".join(lines)


@dataclass
class RewriteResult:
    gm: GraphModule
    plan: Optional[Plan]
    report: PassReport
    extra_outputs: int = 0  # trailing graph outputs added by tomec (source map, sizes)
    num_outputs: int = 0
    tokens_per_block: list[int] = field(default_factory=list)  # measured on the validated graph
    graph_break: Optional[str] = None  # the graph ended at a break (why, and where)


def _device_type(block: AttentionBlock) -> str:
    value = gu.original_value(block.k)
    return value.device.type


def _refuse_unmerged_attention(
    skipped: list[Skipped], inserted: Inserted, config: TomecConfig, report: PassReport
) -> None:
    """An attention that is not a block but sees merged tokens would miss log(size): refuse it."""
    if inserted.size is None or not config.prop_attn:
        return
    later = gu.descendants(inserted.first_merge)
    for s in skipped:
        if s.node in later:
            msg = (
                f"{gu.describe(s.node)} sees merged tokens but is not an attention block tomec "
                f"rewrites ({s.reason}), so it would not get proportional attention"
            )
            if config.strict:
                raise UnsupportedModelError(msg + "; use prop_attn=False or strict=False")
            warnings.warn("tomec: " + msg, stacklevel=2)
            report.notes.append("warning: " + msg)


def _graph_break(gm: GraphModule, num_blocks: int) -> Optional[str]:
    """Why ``gm`` ends at a graph break (Dynamo records it on the module), or None."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    stack = getattr(reason, "user_stack", None) or []
    where = f" at {stack[-1].filename}:{stack[-1].lineno}" if stack else ""
    return (
        f"the traced graph stops at a graph break after {num_blocks} attention blocks "
        f"({str(reason.reason).strip()}{where}); the merge schedule spans the whole model, so its "
        f"blocks must be in one graph: compile with fullgraph=True to see the break, then remove it"
    )


def _append_outputs(gm: GraphModule, nodes: list[Node]) -> tuple[int, int]:
    out = next(iter(gm.graph.find_nodes(op="output")))
    value = out.args[0]
    if isinstance(value, (tuple, list)):
        out.args = (tuple(value) + tuple(nodes),)
        return len(value), len(nodes)
    out.args = ((value, *nodes),)
    return 1, len(nodes)


def rewrite(
    gm: GraphModule, example_inputs: Sequence[Any], config: TomecConfig, after_break: Optional[str] = None
) -> RewriteResult:
    """Insert token merging into a traced ViT graph (in place) and validate the result.
    ``after_break``: an earlier graph of the same model ended at this graph break, so this one may be
    its continuation (blocks whose schedule and prefix tokens cannot be known): left unchanged."""
    report = PassReport(graph_nodes=len(gm.graph.nodes))
    decomposed = decompose_attention_calls(gm)
    report.notes += decomposed
    for line in decomposed:
        log.info("tomec: %s", line)
    if any(line.startswith("spelled out") for line in decomposed):
        validate(gm, example_inputs)  # traced metadata for the new nodes
    original = {n: gu.meta_shape(n, original=True) for n in gm.graph.nodes}
    found: FoundBlocks = find_blocks(gm)
    report.skipped = [str(s) for s in found.skipped]
    if not found.blocks:
        msg = f"no attention block found in the graph; looked for {LOOKED_FOR}"
        if found.skipped:
            msg += "; candidates skipped: " + "; ".join(report.skipped)
        if config.strict:
            raise UnsupportedModelError(msg + " (strict=False compiles such a graph unchanged)")
        warnings.warn(f"tomec: {msg}; compiling the graph unchanged", stacklevel=2)
        log.warning("tomec: %s; compiling the graph unchanged", msg)
        report.notes.append("no attention block: compiled unchanged")
        return RewriteResult(gm, None, report)

    broken = _graph_break(gm, len(found.blocks))
    if broken and config.strict:
        raise UnsupportedModelError(broken + " (strict=False compiles it unchanged)")
    if broken or after_break:
        msg = broken or f"these {len(found.blocks)} attention blocks may continue a graph split by a break: {after_break}"
        warnings.warn(f"tomec: {msg}; compiling this graph unchanged", stacklevel=2)
        log.warning("tomec: %s; compiling this graph unchanged", msg)
        report.notes.append("graph break: compiled unchanged")
        return RewriteResult(gm, None, report, graph_break=broken)

    plan = make_plan(found.blocks, config)
    report.schedule, report.protected = plan.schedule, plan.protected
    inserted = insert_merges(gm, plan, config, _device_type(found.blocks[0]))
    report.blocks = inserted.lines
    if inserted.biased_blocks:
        report.notes.append(
            f"proportional attention (log size, {inserted.attention_impl} for SDPA calls) in blocks "
            f"{inserted.biased_blocks}"
        )
    _refuse_unmerged_attention(found.skipped, inserted, config, report)

    result = RewriteResult(gm, plan, report)
    if inserted.size is not None:
        report.notes += weight_token_means(gm, inserted.last_merge, inserted.size, plan.num_tokens)
        if config.trace_source:
            result.num_outputs, result.extra_outputs = _append_outputs(
                gm, [inserted.source, inserted.size]
            )
    erase_replaced(gm, inserted)  # what one-step-ahead blocks' merged branches replaced
    report.shape_literals = len(fix_shapes(gm, example_inputs, original))
    validate(gm, example_inputs)
    result.tokens_per_block = [int(gu.meta_shape(b.k)[2]) for b in plan.blocks]
    return result
