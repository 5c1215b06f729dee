"""Steps 5 and 7: rewrite the token counts that Dynamo baked into reshapes, then validate.

Dynamo graphs hold literal sizes (``reshape(t, 2, 197, 3, 6, 64)``). After a merge the token axis
shrinks, so every downstream literal that stands for it must change. Literals are matched by
*position*, never by value (batch and head counts can equal each other): a reshape maps groups of
input dimensions onto groups of output dimensions with equal products, and the output dimension in
the group of the input's token axis is the one to rewrite. The fix runs inside a fake-tensor
propagation, so each reshape sees the already-rewritten shape of its input.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.fx import GraphModule, Node
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from tomec.errors import UnsupportedModelError

from . import graph_utils as gu

log = logging.getLogger("tomec.passes")


def _hint(d: Any) -> int:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        hint = d.node.hint
        if hint is not None:
            return int(hint)
    return -1


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _groups(src: Sequence[int], dst: Sequence[int]) -> Optional[list[tuple[range, range]]]:
    """Pair runs of ``src`` and ``dst`` dimensions with equal products (a reshape's structure)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        i0, j0, pi, pj = i, j, 1, 1
        if i < len(src):
            pi, i = pi * src[i], i + 1
        if j < len(dst):
            pj, j = pj * dst[j], j + 1
        while pi != pj:
            if pi < pj and i < len(src):
                pi, i = pi * src[i], i + 1
            elif pj < pi and j < len(dst):
                pj, j = pj * dst[j], j + 1
            else:
                return None
        groups.append((range(i0, i), range(j0, j)))
    return groups


def _shape_args(node: Node) -> tuple[list, bool]:
    rest = list(node.args[1:])
    if not rest and "shape" in node.kwargs:
        rest = [node.kwargs["shape"]]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0]), True
    return rest, False


def _set_shape_args(node: Node, shape: list, packed: bool) -> None:
    if "shape" in node.kwargs and len(node.args) == 1:
        node.kwargs = {**node.kwargs, "shape": tuple(shape)}
    elif packed:
        node.args = (node.args[0], tuple(shape))
    else:
        node.args = (node.args[0], *shape)


def fixed_reshape_args(
    old_in: Sequence[Any], new_in: Sequence[Any], old_out: Sequence[Any], literal: list
) -> Optional[list]:
    """The reshape literal for the new input shape, or None when it cannot be derived.

    ``old_in``/``old_out``: the shapes Dynamo traced; ``new_in``: the input shape now;
    ``literal``: the shape arguments (ints, ``-1``, or symbolic nodes that follow on their own).
    """
    if len(old_in) != len(new_in) or len(literal) != len(old_out):
        return None
    changed = [t for t in range(len(old_in)) if not _same(old_in[t], new_in[t])]
    if not changed:
        return literal
    groups = _groups([_hint(d) for d in old_in], [_hint(d) for d in old_out])
    if groups is None:
        return None
    out = list(literal)
    for src, dst in groups:
        moved = [t for t in changed if t in src]
        if not moved:
            continue
        if len(dst) == 1:
            p = dst[0]
            new_value = math.prod(_hint(new_in[t]) for t in src)
        else:
            if len(moved) != 1:
                return None
            t = moved[0]
            hits = [p for p in dst if _same(old_out[p], old_in[t])]
            if len(hits) != 1:
                return None
            p, new_value = hits[0], new_in[t]
        if isinstance(out[p], int) and out[p] != -1:
            out[p] = int(new_value) if isinstance(new_value, int) else new_value
    return out


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class _NamingProp(FakeTensorProp):
    """Fake-tensor propagation whose failures name the node (never a trace from deep inside)."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        # Buffers tomec registers (DTEM's learned heads) are real tensors: give the mode a fake.
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value

    def propagate_dont_convert_inputs(self, *args: Any) -> Any:
        with _quiet_fake_tensor_log():  # a failure is re-raised naming the node: no log traceback
            return super().propagate_dont_convert_inputs(*args)

    def run_node(self, n: Node) -> Any:
        try:
            return super().run_node(n)
        except UnsupportedModelError:
            raise
        except Exception as e:
            raise UnsupportedModelError(
                f"after merging, {gu.describe(n)} fails on the new token counts: "
                f"{type(e).__name__}: {e}"
            ) from e


class _ShapeFixer(_NamingProp):
    def __init__(self, gm: GraphModule, mode: Any, original: dict) -> None:
        super().__init__(gm, mode)
        self.original = original
        self.rewritten: list[str] = []

    def run_node(self, n: Node) -> Any:
        if gu.is_reshape(n) and isinstance(n.args[0], Node):
            self._fix(n)
        return super().run_node(n)

    def _fix(self, n: Node) -> None:
        src = n.args[0]
        # A node that replaced a traced one (SDPA written out for log size) carries its metadata.
        old_in = self.original.get(src) or gu.meta_shape(src, original=True)
        old_out = self.original.get(n) or gu.meta_shape(n, original=True)  # or a copy's
        value = self.env.get(src)
        if old_in is None or old_out is None or not isinstance(value, torch.Tensor):
            return
        literal, packed = _shape_args(n)
        new = fixed_reshape_args(old_in, tuple(value.shape), old_out, literal)
        if new is None:
            raise UnsupportedModelError(
                f"cannot rewrite the token count in {gu.describe(n)}: it reshapes "
                f"{list(old_in)} to {list(old_out)}, and the input is now {list(value.shape)}"
            )
        if new != literal:
            _set_shape_args(n, new, packed)
            self.rewritten.append(f"{n.name}: {literal} -> {new}")


def _placeholder_values(gm: GraphModule, example_inputs: Sequence[Any], mode: Any) -> list:
    values = []
    for node, example in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        value = gu.original_value(node)
        if value is None:
            value = mode.from_tensor(example) if isinstance(example, torch.Tensor) else example
        values.append(value)
    return values


def fake_mode_for(gm: GraphModule, example_inputs: Sequence[Any]) -> Any:
    """The placeholders' own fake mode (Dynamo's), so symbolic batch sizes stay the same symbols."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    for node in gm.graph.find_nodes(op="placeholder"):
        mode = getattr(gu.original_value(node), "fake_mode", None)
        if mode is not None:
            return mode
    mode = detect_fake_mode(example_inputs)
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)


def fix_shapes(gm: GraphModule, example_inputs: Sequence[Any], original: dict) -> list[str]:
    """Propagate fake tensors through ``gm``, rewriting reshape literals; returns what changed."""
    mode = fake_mode_for(gm, example_inputs)
    fixer = _ShapeFixer(gm, mode, original)
    fixer.propagate_dont_convert_inputs(*_placeholder_values(gm, example_inputs, mode))
    for line in fixer.rewritten:
        log.debug("tomec: shape literal %s", line)
    return fixer.rewritten


def validate(gm: GraphModule, example_inputs: Sequence[Any]) -> None:
    """Fake-tensor propagation over the final graph; failures name the node, then metadata is
    refreshed so later compilers see the merged shapes."""
    gm.graph.lint()
    mode = fake_mode_for(gm, example_inputs)
    _NamingProp(gm, mode).propagate_dont_convert_inputs(*_placeholder_values(gm, example_inputs, mode))
    for node in gm.graph.nodes:
        if "val" in node.meta and node.op != "placeholder":
            node.meta["example_value"] = node.meta["val"]
    gm.recompile()
