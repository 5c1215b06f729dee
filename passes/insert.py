"""Steps 3 and 4: insert merge nodes after the attention residuals, thread sizes (and the source
map) to later blocks, and give every later attention the proportional-attention bias ``log(size)``.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Optional

from torch.fx import GraphModule, Node

from tomec import ops
from tomec.config import TomecConfig
from tomec.errors import ConfigError, UnsupportedModelError
from tomec.methods import merge_step, merge_step_ahead

from . import graph_utils as gu
from .blocks import AttentionBlock
from .plan import Plan

log = logging.getLogger("tomec.passes")


@dataclass
class Inserted:
    """What the insertion left in the graph, for the later passes and the report."""

    size: Optional[Node] = None  # sizes after the last merge [B, N_out, 1]
    source: Optional[Node] = None  # source map after the last merge [B, N0]
    first_merge: Optional[Node] = None  # everything downstream of it sees merged tokens
    last_merge: Optional[Node] = None
    merged_blocks: list[int] = field(default_factory=list)
    biased_blocks: list[int] = field(default_factory=list)
    attention_impl: str = ""
    lines: list[str] = field(default_factory=list)
    replaced: list[Node] = field(default_factory=list)  # one-step-ahead branches, now unused


_ATTENTION = {"manual": ops.attention, "extra_dim": ops.attention_extra_dim, "flex": ops.attention_flex}


def _impl_for(config: TomecConfig, device_type: str) -> str:
    """The ``impl=`` of the inserted ops: plain PyTorch for Inductor on CPU; on CUDA the config's
    (``"auto"``: each op takes its Triton kernel unless Triton is missing or the kernel failed to
    compile for the device, see tomec.kernel_check)."""
    if device_type == "cuda" or config.impl == "torch":
        return config.impl
    if config.impl == "triton":
        raise ConfigError(
            f"impl='triton' runs tomec's Triton kernels on CUDA tensors; this graph's tensors are on "
            f"{device_type} (use impl='auto' or 'torch')"
        )
    return "torch"


def _prop_attn_impl(config: TomecConfig, device_type: str) -> str:
    if config.prop_attn_impl != "auto":
        return config.prop_attn_impl
    return "manual" if device_type == "cpu" else "mask"


def _add_bias(gm: GraphModule, block: AttentionBlock, bias: Node, impl: str) -> None:
    graph = gm.graph
    if block.form == "manual":
        with graph.inserting_before(block.attn):
            biased = graph.call_function(operator.add, (block.logits, bias))
        block.attn.replace_input_with(block.logits, biased)
        return
    sdpa = block.attn
    mask = gu.arg(sdpa, 3, "attn_mask")
    scale = gu.arg(sdpa, 6, "scale")
    if gu.arg(sdpa, 4, "dropout_p", 0.0) != 0.0 or gu.arg(sdpa, 7, "enable_gqa", False):
        impl = "mask"  # the explicit chain here has neither dropout nor grouped-query heads
    if mask is not None and impl in ("extra_dim", "flex"):
        impl = "manual"  # an existing mask has no place in those forms
    with graph.inserting_before(sdpa):
        if mask is not None:
            bias = graph.call_function(ops.combine_masks, (mask, bias))
        if impl != "mask":
            attn = graph.call_function(_ATTENTION[impl], (block.q, block.k, block.v, bias, scale))
    if impl != "mask":
        attn.meta.update({k: v for k, v in sdpa.meta.items() if k != "val"})
        sdpa.replace_all_uses_with(attn)
        graph.erase_node(sdpa)
        block.attn = block.out = attn
        return
    args = list(sdpa.args[:3])
    kwargs = {k: v for k, v in sdpa.kwargs.items() if k != "attn_mask"}
    extra = list(sdpa.args[3:])
    if extra:
        extra[0] = bias
        args += extra
    else:
        kwargs["attn_mask"] = bias
    sdpa.args, sdpa.kwargs = tuple(args), kwargs


def insert_merges(gm: GraphModule, plan: Plan, config: TomecConfig, device_type: str) -> Inserted:
    """Rewrite ``gm`` in place following ``plan``; returns the final size/source nodes."""
    graph = gm.graph
    method = config.method_spec
    impl = _impl_for(config, device_type)
    attn_impl = _prop_attn_impl(config, device_type)
    state = Inserted(attention_impl=attn_impl)
    bias: Optional[Node] = None

    site = config.site
    for block, r, n_in in zip(plan.blocks, plan.schedule, plan.tokens_in):
        ahead = site == "ahead" and r > 0
        if state.size is not None and config.prop_attn and not ahead:  # ahead: the step biases
            if bias is None:
                with graph.inserting_before(block.attn):
                    bias = graph.call_function(ops.log_size_bias, (state.size, block.dtype))
            _add_bias(gm, block, bias, attn_impl)
            state.biased_blocks.append(block.index)
        if r == 0 and not method.reorders_at_r0:
            state.lines.append(f"block {block.index} ({block.path}): {n_in} tokens, no merge")
            continue
        if site == "block":
            step = _insert_transform(gm, block, r, plan, method, impl)
        elif ahead:
            step = _insert_ahead_step(gm, block, r, plan, config, state, impl)
            bias = None
        else:
            step = _insert_merge_step(gm, block, r, plan, config, state, impl)
            bias = None  # the sizes changed
        if state.first_merge is None:
            state.first_merge = step
        state.last_merge = step
        state.merged_blocks.append(block.index)
        line = f"block {block.index} ({block.path}): {n_in} -> {n_in - r} tokens (r={r})"
        if r == 0:
            line = f"block {block.index} ({block.path}): {n_in} tokens, reordered A then B (r=0)"
        state.lines.append(line)
        log.info("tomec: rewrote %s", line)
    return state


def _learned_params(gm, block, plan, config) -> Optional[dict[str, Node]]:
    """The block's learned tensors (``Method.params``) as buffers of ``gm`` read by get_attr nodes
    (inserted before the residual), in the block's dtype and device; None for other methods."""
    method = config.method_spec
    if method.params is None:
        return None
    k = gu.original_value(block.k)
    tensors = method.params(
        config.method_options, layer=block.index, num_layers=len(plan.blocks),
        channels=int(gu.meta_shape(block.residual, True)[-1]), head_dim=int(k.shape[-1]),
    )
    nodes = {}
    for name, tensor in tensors.items():
        attr = f"_tomec_{method.name}_{block.index}_{name}"
        gm.register_buffer(attr, tensor.detach().to(device=k.device, dtype=block.dtype).clone())
        sources = getattr(gm, "_param_name_to_source", None)
        if sources is not None:
            # AOTAutograd lifts a Dynamo graph's attributes as inputs and wants each one's source;
            # these are tomec's own constants, guarded by nothing
            from torch._dynamo.source import ConstantSource

            gm._param_name_to_source = {**sources, attr: ConstantSource(attr)}  # Dynamo's stays as is
        with gm.graph.inserting_before(block.residual):
            nodes[name] = gm.graph.get_attr(attr)
    return nodes


def _step_kwargs(block, r, plan, config, impl) -> dict:
    """The keyword arguments of a block's step call (``merge_step`` or ``merge_step_ahead``)."""
    method = config.method_spec
    return {
        "method": method.name, "r": r, "protected": plan.protected, "layer": block.index,
        "num_layers": len(plan.blocks), "scale": block.scale, "prop_attn": config.prop_attn,
        "trace_source": config.trace_source, "impl": impl,
        # learned weights travel as get_attr nodes, never as node constants
        "options": config.method_options.graph_args(),
    }


def _thread(graph, step, state, config) -> Node:
    """The step's merged tokens; its sizes (and source map) become the state later blocks read."""
    x_out = graph.call_function(operator.getitem, (step, 0))
    state.size = graph.call_function(operator.getitem, (step, 1))
    if config.trace_source:
        state.source = graph.call_function(operator.getitem, (step, 2))
    return x_out


def _insert_merge_step(gm, block, r, plan, config, state, impl) -> Node:
    """One ``merge_step`` call right after the attention residual; later uses see merged tokens."""
    graph = gm.graph
    residual = block.residual
    method = config.method_spec
    kwargs = _step_kwargs(block, r, plan, config, impl)
    if "attn_in" in method.graph_inputs:
        if block.attn_in is None:
            raise UnsupportedModelError(
                f"method {method.name!r} reads the tokens entering the attention projections, but "
                f"block {block.index} ({block.path}) computes its keys without a linear projection "
                f"of its [B, N, C] tokens that tomec recognizes"
            )
        kwargs["attn_in"] = block.attn_in
    params = _learned_params(gm, block, plan, config)
    if params is not None:
        kwargs["params"] = params
    with graph.inserting_before(residual.next):
        step = graph.call_function(
            merge_step, (residual, state.size, state.source, block.k, block.q), kwargs
        )
        x_out = _thread(graph, step, state, config)
    residual.replace_all_uses_with(x_out, delete_user_cb=lambda u: u is not step)
    return step


def _insert_ahead_step(gm, block, r, plan, config, state, impl) -> Node:
    """One step ahead (MCTF): a ``merge_step_ahead`` call on the block's input, fed by the block's
    own queries and keys on the unmerged tokens; then the block's attention branch again on the
    merged tokens (a copy, its values from them) with the merged attention map applied to its
    values in place of the attention, and the residual on the merged tokens. The unmerged branch
    keeps only what computes q and k (the rest is dead: removed once every block is rewritten)."""
    graph = gm.graph
    residual, stream = block.residual, block.stream
    branch = next(a for a in residual.args if isinstance(a, Node) and a is not stream)
    kwargs = _step_kwargs(block, r, plan, config, impl)
    # the attention branch: what lies between the block's input and the residual add
    inside = gu.descendants(stream) & (gu.ancestors(branch, stop={stream}) | {branch})
    copied = [n for n in graph.nodes if n in inside]
    with graph.inserting_before(residual):
        step = graph.call_function(
            merge_step_ahead, (stream, state.size, state.source, block.k, block.q), kwargs
        )
        x_out = _thread(graph, step, state, config)
        probs = graph.call_function(operator.getitem, (step, 3))
        env: dict[Node, Node] = {stream: x_out}
        for n in copied:
            if n is block.out:
                env[n] = graph.call_function(ops.apply_attention, (probs, env[block.v]))
                env[n].meta.update({k: v for k, v in n.meta.items() if k != "val"})
                continue
            env[n] = graph.node_copy(n, lambda a: env.get(a, a))
    residual.replace_input_with(stream, x_out)
    residual.replace_input_with(branch, env[branch])  # the rest of the old branch is now dead
    state.replaced.extend(copied)
    return step


def _in_place(node: Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")


def erase_replaced(gm: GraphModule, inserted: Inserted) -> int:
    """Erase what the one-step-ahead branches left unused (last first, so chains go too): only those
    nodes, and never an in-place call (the rest of the graph is not touched). Returns the count."""
    erased = 0
    for node in reversed(inserted.replaced):
        if not node.users and not _in_place(node) and node.op != "placeholder":
            gm.graph.erase_node(node)
            erased += 1
    inserted.replaced = []
    return erased


def _insert_transform(gm, block, r, plan, method, impl) -> Node:
    """A token transform (DCT) right after the block's MLP residual."""
    out = block.block_out
    if out is None:
        raise UnsupportedModelError(
            f"method {method.name!r} acts on the block's output, but no MLP residual add follows "
            f"the attention residual of block {block.index} ({block.path})"
        )
    with gm.graph.inserting_before(out.next):
        step = gm.graph.call_function(method.transform, (out, r, plan.protected), {"impl": impl})
    out.replace_all_uses_with(step, delete_user_cb=lambda u: u is not step)
    return step
