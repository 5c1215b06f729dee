"""Step 1 of the pipeline: find the attention blocks of a traced ViT.

A block is confirmed by structure, not by names: an attention (an SDPA call, or the explicit
``q kᵀ → softmax → · v`` chain) whose keys derive from a residual stream, and the residual ``add``
that joins the attention branch back to that stream. Every attention that does not fit is recorded
with the reason it was skipped.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from . import graph_utils as gu

log = logging.getLogger("tomec.passes")

_UP_DEPTH = 4  # ops between the logits and the first matmul (scale, mask add, dtype cast)
_DOWN_DEPTH = 4  # ops between softmax and the second matmul (dropout, dtype cast)
_RESIDUAL_DEPTH = 16  # ops between the attention output and the residual add


@dataclass
class AttentionBlock:
    """The nodes of one attention block that the rewrite touches."""

    index: int
    path: str  # module path of the block, e.g. "blocks.3"
    form: str  # "sdpa" or "manual"
    q: Node
    k: Node
    v: Node
    attn: Node  # the SDPA node, or the softmax node of the manual chain
    logits: Optional[Node]  # manual chain: the softmax input, where log(size) is added
    out: Node  # attention output [B, H, N, d]
    residual: Node  # add(stream, branch): the merge goes right after it
    stream: Node  # the block's input on the residual stream
    num_tokens: int
    dtype: torch.dtype
    scale: Optional[float]  # the logit scale (None: SDPA's default, d ** -0.5)
    block_out: Optional[Node]  # add(residual, mlp branch): the block's output, if found
    attn_in: Optional[Node] = None  # the tokens entering the k projection [B, N, C], if found


@dataclass
class Skipped:
    node: Node
    reason: str

    def __str__(self) -> str:
        return f"{gu.describe(self.node)}: {self.reason}"


@dataclass
class FoundBlocks:
    blocks: list[AttentionBlock]
    skipped: list[Skipped]


@dataclass
class _Attention:
    form: str
    q: Node
    k: Node
    v: Node
    attn: Node
    logits: Optional[Node]
    out: Node
    scale: Optional[float]


def _walk_up_to_matmul(node: Node) -> Optional[Node]:
    """From the softmax input back to ``q @ kᵀ`` through scale multiplies and mask adds."""
    n = node
    for _ in range(_UP_DEPTH + 1):
        if gu.is_matmul(n):
            return n
        if not (gu.is_add(n) or gu.is_mul(n) or gu.is_passthrough(n)):
            return None
        shape = gu.meta_shape(n, original=True)
        nxt = [a for a in n.args if isinstance(a, Node) and gu.meta_shape(a, original=True) == shape]
        if not nxt:
            return None
        n = nxt[0]
    return None


def _constant_factor(node: Node) -> Optional[tuple[Node, float]]:
    """``t * c``, ``c * t`` or ``t / c`` with a number ``c`` → ``(t, factor)``; else None."""
    if not gu.is_mul(node) or len(node.args) != 2:
        return None
    a, b = node.args
    divide = node.target in (operator.truediv, torch.div) or node.target == "div"
    if isinstance(a, Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a, (1.0 / b if divide else float(b))
    if isinstance(b, Node) and isinstance(a, (int, float)) and not divide and not isinstance(a, bool):
        return b, float(a)
    return None


def _manual_scale(q: Node, logits: Node, scores: Node) -> tuple[Node, float]:
    """The unscaled q and the logit scale of the manual chain (timm scales q, HF the logits)."""
    scale = 1.0
    found = _constant_factor(q)
    if found:
        q, scale = found[0], scale * found[1]
    n = logits
    while n is not scores:
        found = _constant_factor(n)
        if found:
            scale *= found[1]
        n = next(a for a in n.args if isinstance(a, Node) and gu.meta_shape(a, True) == gu.meta_shape(n, True))
    return q, scale


def _manual_attention(softmax: Node) -> Union[_Attention, str]:
    logits = gu.arg(softmax, 0, "input")
    if not isinstance(logits, Node):
        return "softmax of a non-tensor"
    scores = _walk_up_to_matmul(logits)
    if scores is None:
        return "softmax input is not q @ kᵀ (through scale and mask only)"
    q, kt = scores.args[0], scores.args[1]
    if not (isinstance(kt, Node) and gu.is_transpose(kt)):
        return "second operand of q @ kᵀ is not a transpose of k"
    k = kt.args[0]
    n, out = softmax, None
    for _ in range(_DOWN_DEPTH + 1):
        users = list(n.users)
        if len(users) != 1:
            return f"softmax output has {len(users)} users, expected one path to · v"
        u = users[0]
        if gu.is_matmul(u) and u.args[0] is n:
            out = u
            break
        if not gu.is_passthrough(u):
            return f"softmax output goes to {gu.describe(u)}, not to · v"
        n = u
    if out is None:
        return "no · v after the softmax"
    q, scale = _manual_scale(q, logits, scores)
    return _Attention("manual", q, k, out.args[1], softmax, logits, out, scale)


def _sdpa_attention(node: Node) -> Union[_Attention, str]:
    q, k, v = gu.arg(node, 0, "query"), gu.arg(node, 1, "key"), gu.arg(node, 2, "value")
    if gu.arg(node, 5, "is_causal", False) is True:
        return "causal attention"
    if not all(isinstance(t, Node) for t in (q, k, v)):
        return "q, k or v is not a traced tensor"
    scale = gu.arg(node, 6, "scale")
    return _Attention("sdpa", q, k, v, node, None, node, None if scale is None else float(scale))


def _find_residual(att: _Attention) -> Union[tuple[Node, Node], str]:
    """The first ``add`` joining the attention branch to a stream that the keys derive from."""
    branch = {att.out}
    frontier = [att.out]
    k_ancestors = gu.ancestors(att.k)
    for _ in range(_RESIDUAL_DEPTH):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in branch:
                    continue
                if gu.is_add(u):
                    tensors = [a for a in u.args if isinstance(a, Node)]
                    others = [a for a in tensors if a not in branch]
                    if len(tensors) == 2 and len(others) == 1 and others[0] in k_ancestors:
                        if gu.meta_shape(others[0], True) == gu.meta_shape(u, True):
                            return u, others[0]
                branch.add(u)
                nxt.append(u)
        frontier = nxt
        if not frontier:
            break
    return "no residual add joins the attention output to the stream its keys come from"


def _find_block_output(residual: Node) -> Optional[Node]:
    """The add of ``residual`` and a branch computed from it (the MLP residual)."""
    branch = gu.descendants(residual)
    for u in residual.users:
        if gu.is_add(u):
            others = [a for a in u.args if isinstance(a, Node) and a is not residual]
            if len(others) == 1 and others[0] in branch:
                return u
    return None


_PROJECTION_DEPTH = 8  # ops between the k projection and k (reshape, permute, unbind, getitem, norm)


def _is_linear(node: Node) -> bool:
    return gu.is_call(node, {F.linear, torch._C._nn.linear})


def _attention_input(att: _Attention, stream: Node) -> Optional[Node]:
    """The tokens the k projection reads (after the block's first norm): walk up from k along the
    tensor argument through reshapes, permutes, unbind/getitem and per-head norms to a linear; its
    input must be ``[B, N, C]`` like the stream. None when the chain has another form."""
    n = att.k
    want = gu.meta_shape(stream, True)
    for _ in range(_PROJECTION_DEPTH):
        if _is_linear(n):
            inp = gu.arg(n, 0, "input")
            ok = isinstance(inp, Node) and gu.meta_shape(inp, True) == want
            return inp if ok and (inp is stream or stream in gu.ancestors(inp, stop={stream})) else None
        tensors = [a for a in n.args if isinstance(a, Node)]
        if not tensors:
            return None
        n = tensors[0]
    return None


def _check_shapes(att: _Attention, residual: Node) -> Optional[str]:
    q, k = gu.meta_shape(att.q, True), gu.meta_shape(att.k, True)
    x = gu.meta_shape(residual, True)
    if q is None or k is None or x is None:
        return "shapes unknown (no traced metadata)"
    if len(x) != 3:
        return (f"residual stream is not [B, N, C] (shape {list(x)}): attention on a 2-D token grid "
                f"(windows as in Swin-style models, or grid-relative positions as in SAM) cannot be merged")
    if len(k) != 4 or len(q) != 4:
        return f"q/k are not [B, H, N, d] (q {list(q)}, k {list(k)})"
    if q[0] != x[0]:
        return f"windowed attention: q's leading dimension {q[0]} differs from the batch {x[0]}"
    if k[2] != x[1] or q[2] != x[1]:
        return f"cross attention: q has {q[2]} tokens, k {k[2]}, the stream {x[1]}"
    if not isinstance(x[1], int):
        return f"the token count {x[1]} is dynamic; tomec needs a static image size"
    return None


def _position_table(att: _Attention, stream: Node) -> Optional[str]:
    """A per-token buffer (rotary table, relative position index) feeding q, k or the logits: such
    attention depends on each token's grid position, which a merged token no longer has."""
    n = gu.meta_shape(stream, True)[1]
    feeds = [att.q, att.k] + ([att.logits] if att.logits is not None else [])
    if att.form == "sdpa" and isinstance(gu.arg(att.attn, 3, "attn_mask"), Node):
        feeds.append(gu.arg(att.attn, 3, "attn_mask"))
    leaves = set()
    for node in feeds:
        leaves |= {a for a in gu.ancestors(node, stop={stream}) | {node} if a.op in ("placeholder", "get_attr")}
    leaves.discard(stream)
    for leaf in sorted(leaves, key=lambda a: a.name):
        value = gu.original_value(leaf)
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter) or value.dim() < 1:
            continue
        # [.., N, ..] tables, or an [N·N] relative position index flattened (timm's RelPosMlp)
        flat_square = value.dim() == 1 and any(value.numel() == m * m for m in range(n - 8, n + 1))
        if flat_square or value.dim() >= 2 and any(isinstance(d, int) and n - 8 <= d <= n for d in value.shape):
            return (f"position-dependent attention: {leaf.name} of shape {list(value.shape)} (a per-token "
                    f"table for {n} tokens: rotary or relative position embeddings, as in EVA-02, BEiT or "
                    f"SAM) enters q, k or the logits; a merged token has no single position")
    return None


def find_blocks(gm: GraphModule) -> FoundBlocks:
    """Find every attention block in ``gm`` (graph order), and every attention skipped, with why."""
    found: list[tuple[_Attention, Node, Node]] = []
    skipped: list[Skipped] = []
    for node in gm.graph.nodes:
        if gu.is_sdpa(node):
            att = _sdpa_attention(node)
        elif gu.is_softmax(node):
            att = _manual_attention(node)
        else:
            continue
        if isinstance(att, str):
            skipped.append(Skipped(node, att))
            continue
        res = _find_residual(att)
        if isinstance(res, str):
            skipped.append(Skipped(node, res))
            continue
        problem = _check_shapes(att, res[0]) or _position_table(att, res[1])
        if problem:
            skipped.append(Skipped(node, problem))
            continue
        found.append((att, *res))

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found.sort(key=lambda t: order[t[1]])
    blocks = []
    for index, (att, residual, stream) in enumerate(found):
        k_val = gu.original_value(att.k)
        blocks.append(
            AttentionBlock(
                index=index,
                path=gu.module_path(residual),
                form=att.form,
                q=att.q,
                k=att.k,
                v=att.v,
                attn=att.attn,
                logits=att.logits,
                out=att.out,
                residual=residual,
                stream=stream,
                num_tokens=int(gu.meta_shape(residual, True)[1]),
                dtype=k_val.dtype,
                scale=att.scale,
                block_out=_find_block_output(residual),
                attn_in=_attention_input(att, stream),
            )
        )
    for s in skipped:
        log.info("tomec: skipped attention candidate %s", s)
    return FoundBlocks(blocks, skipped)
