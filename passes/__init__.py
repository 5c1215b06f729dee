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
from tomec.frames import DynamoFrame

from . import graph_utils as gu
from .decompose import decompose_attention_calls
from .blocks import AttentionBlock, FoundBlocks, Skipped, find_blocks
from .insert import Inserted, erase_replaced, insert_merges
from .plan import Plan, make_plan
from .pooling import token_means, weight_token_means
from .shapes import fix_shapes, validate

__all__ = ["rewrite", "RewriteResult", "PassReport", "ModelContext", "find_blocks", "AttentionBlock", "Plan"]

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


def _graph_break(gm: GraphModule) -> Optional[str]:
    """Where and why ``gm`` ends at a graph break (Dynamo records it on the module), or None."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    stack = getattr(reason, "user_stack", None) or []
    where = f" at {stack[-1].filename}:{stack[-1].lineno}" if stack else ""
    first_line = str(reason.reason).strip().splitlines()[0] if str(reason.reason).strip() else "graph break"
    return f"{first_line}{where}"


@dataclass
class ModelContext:
    """What the backend knows of the model beyond this graph (the Python stack, earlier graphs)."""

    frame: Optional[DynamoFrame] = None
    earlier_break: Optional[str] = None  # the last graph break an earlier graph of this model ended at
    tokens_out: Optional[int] = None  # the tokens the last block graph passed on (None: no block graph yet)

    @property
    def blocks_seen(self) -> bool:
        """Whether an earlier graph of this model held attention blocks."""
        return self.tokens_out is not None


_FIX_BREAK = (
    "the merge schedule spans the whole model, so its blocks must be in one graph: compile with "
    "fullgraph=True to see the break, then remove it"
)


def _attention_counts(model: Any, found: FoundBlocks) -> Optional[tuple[int, int, str]]:
    """(attention modules in this graph, in the whole model, their class names), by module class;
    None when the model or the classes are unknown."""
    if model is None:
        return None
    nodes = [b.attn for b in found.blocks]
    classes = {gu.module_class(n) for n in nodes} - {None}
    if not classes:
        return None
    nodes += [s.node for s in found.skipped if gu.module_class(s.node) in classes]
    in_graph = len({gu.module_path(n) for n in nodes})
    in_model = sum(1 for m in model.modules() if type(m) in classes)
    return in_graph, in_model, "/".join(sorted(c.__name__ for c in classes))


def _split_blocks(found: FoundBlocks, broken: Optional[str], context: ModelContext) -> Optional[str]:
    """Why this block graph holds only part of the model's blocks (a graph break), or None."""
    counts = _attention_counts(context.frame.model if context.frame else None, found)
    if counts is None:  # the model is unknown: a break after the blocks may cut them short
        if broken:
            return (f"the traced graph stops at a graph break after {len(found.blocks)} attention "
                    f"blocks ({broken}); {_FIX_BREAK}")
        return None
    in_graph, in_model, names = counts
    if in_graph >= in_model:
        return None
    if broken:
        why = f"it stops at a graph break after {len(found.blocks)} attention blocks ({broken})"
    elif context.earlier_break:
        why = (f"a graph break ({context.earlier_break}) split the model, and Dynamo compiled "
               f"{context.frame.describe()} as a graph of its own")
    else:
        why = (f"Dynamo compiled {context.frame.describe()} as a graph of its own (a graph break in "
               f"its caller)")
    return f"this graph holds {in_graph} of the model's {in_model} attention modules ({names}): {why}; {_FIX_BREAK}"


def _skipped_summary(skipped: list[Skipped]) -> str:
    """The first skipped candidate in full, the others counted by kind (the text before a colon):
    one reason, not a copy per block."""
    kinds: dict[str, int] = {}
    for s in skipped[1:]:
        kind = s.reason.split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    more = "; ".join(f"{k} more: {kind}" for kind, k in kinds.items())
    return f"{skipped[0]}" + (f" ({more})" if more else "")


def _unchanged(gm: GraphModule, report: PassReport, note: str, broken: Optional[str]) -> RewriteResult:
    log.info("tomec: %s", note)
    report.notes.append(note)
    return RewriteResult(gm, None, report, graph_break=broken)


def _append_outputs(gm: GraphModule, nodes: list[Node]) -> tuple[int, int]:
    out = next(iter(gm.graph.find_nodes(op="output")))
    value = out.args[0]
    if isinstance(value, (tuple, list)):
        out.args = (tuple(value) + tuple(nodes),)
        return len(value), len(nodes)
    out.args = ((value, *nodes),)
    return 1, len(nodes)


def rewrite(
    gm: GraphModule, example_inputs: Sequence[Any], config: TomecConfig, context: Optional[ModelContext] = None
) -> RewriteResult:
    """Insert token merging into a traced ViT graph (in place) and validate the result.

    ``context``: the model around the graph (the frame Dynamo compiles, earlier graphs of the model),
    so that a graph break is told apart from a model: a graph without attention blocks before or after
    the model's block graph (its stem or head) compiles unchanged; a block graph that holds fewer of
    the model's attention modules than it has is an error naming the break; a block graph that resumes
    after a break protects the model's prefix tokens, which it cannot see concatenated.
    """
    context = context or ModelContext()
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
    broken = _graph_break(gm)
    if not found.blocks:
        if context.blocks_seen:
            means = token_means(gm, context.tokens_out)
            if means:
                msg = (f"the head graph after a graph break averages the {context.tokens_out} merged "
                       f"tokens without their sizes ({', '.join(means)}), as one graph would weight them; "
                       f"remove the break ({context.earlier_break or 'see fullgraph=True'}) for the "
                       f"size-weighted mean")
                warnings.warn("tomec: " + msg, stacklevel=2)
                report.notes.append("warning: " + msg)
            return _unchanged(gm, report, "no attention block: the model's head after its block graph, "
                              "compiled unchanged", broken)
        if broken:
            return _unchanged(gm, report, f"no attention block before a graph break ({broken}): the "
                              "model's stem, compiled unchanged", broken)
        msg = f"no attention block found in the graph; looked for {LOOKED_FOR}"
        if found.skipped:
            msg = f"no attention block tomec can merge in the graph: {_skipped_summary(found.skipped)}"
        if context.earlier_break:
            msg += f"; an earlier graph of this model ended at a graph break ({context.earlier_break})"
        if config.strict:
            raise UnsupportedModelError(msg + " (strict=False compiles such a graph unchanged)")
        warnings.warn(f"tomec: {msg}; compiling the graph unchanged", stacklevel=2)
        log.warning("tomec: %s; compiling the graph unchanged", msg)
        report.notes.append("no attention block: compiled unchanged")
        return RewriteResult(gm, None, report, graph_break=broken)

    split = _split_blocks(found, broken, context)
    if split:
        raise UnsupportedModelError(split)
    starts_after_break = None
    if context.frame is not None and context.frame.resumes:
        starts_after_break = context.earlier_break or f"Dynamo resumes {context.frame.describe()}"
    elif context.frame is None and context.earlier_break:  # the model is unknown: a guess is unsafe
        msg = (f"these {len(found.blocks)} attention blocks may continue a graph split by a break "
               f"({context.earlier_break}); {_FIX_BREAK}")
        if config.strict:
            raise UnsupportedModelError(msg)
        warnings.warn(f"tomec: {msg}; compiling this graph unchanged", stacklevel=2)
        return _unchanged(gm, report, "graph break: compiled unchanged", broken)
    if broken:
        report.notes.append(f"the graph ends at a graph break ({broken}) after all the model's attention blocks")

    model = context.frame.model if context.frame else None
    prefix = getattr(model, "num_prefix_tokens", None)
    plan = make_plan(found.blocks, config, starts_after_break,
                     prefix if isinstance(prefix, int) and not isinstance(prefix, bool) else None)
    report.schedule, report.protected = plan.schedule, plan.protected
    inserted = insert_merges(gm, plan, config, _device_type(found.blocks[0]))
    report.blocks = inserted.lines
    if inserted.biased_blocks:
        report.notes.append(
            f"proportional attention (log size, {inserted.attention_impl} for SDPA calls) in blocks "
            f"{inserted.biased_blocks}"
        )
    _refuse_unmerged_attention(found.skipped, inserted, config, report)

    result = RewriteResult(gm, plan, report, graph_break=broken)
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
