"""Step 0: spell out attention that Dynamo keeps as one opaque call, so the block finder sees it.

Dynamo traces ``nn.MultiheadAttention`` (torchvision's ViT) as a single
``F.multi_head_attention_forward`` node. For plain self-attention (query, key and value the same
tensor; no masks, added biases or zero attention; no dropout; weights not returned) that call is
exactly: input projection, split into heads, SDPA, merge heads, output projection. This pass writes
it out in those ops, on the sequence-first layout the call uses, and leaves any other use of the op
untouched (the finder then reports it as not an attention block).
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch.nn.functional as F
from torch.fx import GraphModule, Node

from . import graph_utils as gu

# F.multi_head_attention_forward's positional parameters, by name.
_MHA_PARAMS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
    "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias",
    "training", "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight",
    "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k", "static_v",
    "average_attn_weights", "is_causal",
)
_MUST_BE_NONE = ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "q_proj_weight",
                 "k_proj_weight", "v_proj_weight", "static_k", "static_v")


def _mha_args(node: Node) -> dict[str, Any]:
    args = dict(zip(_MHA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def _why_not_plain(node: Node, args: dict[str, Any]) -> Optional[str]:
    if not (args.get("query") is args.get("key") is args.get("value")):
        return "not self-attention (query, key and value differ)"
    for name in _MUST_BE_NONE:
        if args.get(name) is not None:
            return f"{name} is set"
    if args.get("add_zero_attn") or args.get("use_separate_proj_weight") or args.get("is_causal"):
        return "add_zero_attn, separate projections or causal masking"
    if args.get("training") and args.get("dropout_p", 0.0) > 0:
        return "attention dropout in training"
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0):
            return "the attention weights are used"
    if not isinstance(args.get("num_heads"), int):
        return "the head count is not a constant"
    return None


def decompose_attention_calls(gm: GraphModule) -> list[str]:
    """Rewrite every plain self-attention ``F.multi_head_attention_forward`` call into linear /
    SDPA ops (in place). Returns a line per call: what was rewritten, or why a call was kept."""
    lines = []
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is F.multi_head_attention_forward):
            continue
        args = _mha_args(node)
        why = _why_not_plain(node, args)
        if why:
            lines.append(f"kept {gu.describe(node)} as one call: {why}")
            continue
        x, heads = args["query"], args["num_heads"]  # x: [L, B, E], sequence first
        g = gm.graph

        def emit(kind: str, target: Any, *call_args: Any) -> Node:
            new = g.call_function(target, call_args) if kind == "f" else g.call_method(target, call_args)
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})  # block paths in reports
            return new

        with g.inserting_before(node):
            # batch first before the projection, so the projection reads [B, L, E] tokens as in
            # other ViTs (methods that read the attention input find it there)
            tokens = emit("m", "transpose", x, 0, 1)  # [B, L, E]
            qkv = emit("f", F.linear, tokens, args["in_proj_weight"], args["in_proj_bias"])  # [B, L, 3E]
            qkv = emit("m", "unflatten", qkv, -1, (3, heads, -1))  # [B, L, 3, H, d]
            qkv = emit("m", "permute", qkv, 2, 0, 3, 1, 4)  # [3, B, H, L, d]
            q, k, v = (emit("f", operator.getitem, qkv, i) for i in range(3))
            out = emit("f", F.scaled_dot_product_attention, q, k, v)  # [B, H, L, d]
            out = emit("m", "transpose", out, 1, 2)
            out = emit("m", "flatten", out, 2)  # [B, L, E]
            out = emit("f", F.linear, out, args["out_proj_weight"], args["out_proj_bias"])
            out = emit("m", "transpose", out, 0, 1)  # [L, B, E], as the call returned
        for user in list(node.users):
            user.replace_all_uses_with(out)
            g.erase_node(user)
        g.erase_node(node)
        lines.append(f"spelled out {gu.describe(out)}: multi_head_attention_forward as linear + SDPA")
    if any(line.startswith("spelled") for line in lines):
        gm.recompile()
    return lines
