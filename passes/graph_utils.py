"""Small helpers over Dynamo FX graphs: op recognition, metadata, module paths."""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.Tensor.add}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, torch.Tensor.mul}
MEAN_FUNCTIONS = {torch.mean, torch.Tensor.mean}
RESHAPE_METHODS = {"reshape", "view"}
RESHAPE_FUNCTIONS = {torch.reshape, torch.Tensor.reshape, torch.Tensor.view}
# Ops the attention output passes through unchanged in meaning on its way to the next matmul.
PASSTHROUGH_FUNCTIONS = {F.dropout, torch.dropout}
PASSTHROUGH_METHODS = {"to", "type", "type_as", "float", "half", "bfloat16", "contiguous"}


def is_call(node: Node, functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> bool:
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def is_sdpa(node: Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def is_softmax(node: Node) -> bool:
    return is_call(node, SOFTMAX_FUNCTIONS, {"softmax"})


def is_matmul(node: Node) -> bool:
    return is_call(node, MATMUL_FUNCTIONS, {"matmul", "__matmul__", "bmm"})


def is_add(node: Node) -> bool:
    return is_call(node, ADD_FUNCTIONS, {"add", "__add__", "add_"})


def is_mul(node: Node) -> bool:
    return is_call(node, MUL_FUNCTIONS | {operator.truediv, torch.div}, {"mul", "__mul__", "div"})


def is_transpose(node: Node) -> bool:
    return is_call(node, {torch.transpose, torch.Tensor.transpose}, {"transpose", "permute"})


def is_passthrough(node: Node) -> bool:
    return is_call(node, PASSTHROUGH_FUNCTIONS, PASSTHROUGH_METHODS)


def is_reshape(node: Node) -> bool:
    return is_call(node, RESHAPE_FUNCTIONS, RESHAPE_METHODS)


def is_mean(node: Node) -> bool:
    return is_call(node, MEAN_FUNCTIONS, {"mean"})


def meta_value(node: Any) -> Any:
    """The traced value of a node: ``val`` after our propagation, else Dynamo's ``example_value``."""
    if not isinstance(node, Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def original_value(node: Any) -> Any:
    """The value Dynamo traced (before any rewrite): ``example_value``, else ``val``."""
    if not isinstance(node, Node):
        return node
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


def meta_shape(node: Any, original: bool = False) -> Optional[tuple]:
    value = original_value(node) if original else meta_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def module_path(node: Node) -> str:
    """Deepest module of a node as a readable path (``blocks.3.attn``), ``<root>`` if none."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "<root>"
    path = list(stack.values())[-1][0]
    return strip_root(path)


def module_class(node: Node) -> Optional[type]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    cls = list(stack.values())[-1][1]
    return cls if isinstance(cls, type) else None


def strip_root(path: str) -> str:
    # Dynamo names the root L['self'] (or L['fn'] for a bare nn.Sequential); drop it.
    if path.startswith("L['"):
        end = path.find("']")
        rest = path[end + 2 :]
        return rest[1:] if rest.startswith(".") else (rest or "<root>")
    return path


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def ancestors(node: Node, stop: Optional[set] = None, limit: int = 10_000) -> set:
    """Nodes that ``node`` depends on (placeholders included), up to ``limit`` nodes."""
    seen: set = set()
    todo = [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        for inp in n.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                if stop is None or inp not in stop:
                    todo.append(inp)
    return seen


def descendants(node: Node) -> set:
    """Nodes that depend on ``node``."""
    seen: set = set()
    todo = [node]
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def describe(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target)
    )
    return f"{node.name} ({node.op} {target} in {module_path(node)})"
