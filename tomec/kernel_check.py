"""Before a CUDA graph is compiled: every Triton kernel it will launch compiles for its device.

The backend calls :func:`check_graph` on each graph it rewrote for CUDA tensors. The merge steps the
passes inserted run once on ``meta`` tensors of the graph's shapes with their kernel launches
recorded (:func:`tomec.kernels.aot.record`), and each distinct kernel configuration is compiled for
the device without running it (``JITFunction.warmup``; once per device and configuration in a
process). A kernel that does not compile, or needs more shared memory than the device gives a block,
never reaches Inductor: with ``impl="auto"`` its op takes the plain-PyTorch implementation, with one
warning that names the kernel and the error; with ``impl="triton"`` the error is raised.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate, map_arg

from . import kernels
from .errors import KernelCompileError
from .methods import merge_step
from .ops.common import broken_ops, ignoring_broken_ops, mark_broken

__all__ = ["check_graph", "compile_on_device"]

log = logging.getLogger("tomec")

# (device, kernel configuration) -> None (compiles) or the error; one compile each per process
_checked: dict[tuple, Optional[str]] = {}


def _meta(value: Any) -> Any:
    """A graph value as a ``meta`` tensor of the same shape, strides and dtype (SymInts at their
    hint); other values unchanged."""
    if isinstance(value, torch.SymInt):
        return int(value.node.hint) if value.node.hint is not None else 2
    if isinstance(value, torch.Tensor):
        size = [_meta(s) for s in value.shape]
        stride = [_meta(s) for s in value.stride()]
        return torch.empty_strided(size, stride, dtype=value.dtype, device="meta")
    return value


def _value(node: Node) -> Any:
    value = node.meta.get("val", node.meta.get("example_value"))
    return map_aggregate(value, _meta)


def _step_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is merge_step]


def _device(node: Node) -> Optional[torch.device]:
    value = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(value, (tuple, list)):
        value = value[0]
    return value.device if isinstance(value, torch.Tensor) else None


def _config_key(launch: Any) -> tuple:
    """One kernel configuration: the constexpr values, the dtypes of the pointers, which integers
    are 1 (Triton specializes those), the launch options."""
    parts = []
    for param, value in zip(launch.kernel.params, launch.bound().values()):
        if param.is_constexpr:
            parts.append(value)
        elif isinstance(value, torch.Tensor):
            parts.append(value.dtype)
        elif isinstance(value, bool):
            parts.append(("bool", value))
        elif isinstance(value, int):
            parts.append(("int", value == 1))
        else:
            parts.append(type(value).__name__)
    options = tuple(sorted((k, v) for k, v in launch.kwargs.items() if k not in launch.kernel.arg_names))
    return (launch.name, tuple(parts), options)


def compile_on_device(launch: Any, device: torch.device) -> Optional[str]:
    """Compile ``launch`` for ``device`` without running it; None, or why it cannot run there."""
    from .kernels import aot

    if not hasattr(launch.kernel, "warmup"):  # not a compile failure: this Triton cannot check
        log.warning("tomec: this Triton has no JITFunction.warmup; kernels are not checked before use")
        return None
    try:
        with torch.cuda.device(device):
            compiled = aot.warmup(launch)
    except Exception as e:  # Triton's CompilationError, ptxas errors, out of resources
        return f"{type(e).__name__}: {aot.error_summary(str(e))}"
    limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    shared = int(getattr(getattr(compiled, "metadata", None), "shared", 0) or 0)
    if limit is not None and shared > limit:
        return f"it needs {shared} B of shared memory per block; the device allows {limit} B"
    return None


def _device_label(device: torch.device) -> str:
    try:
        cc = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{cc[0]}{cc[1]})"
    except Exception:  # a fake CUDA device in tests
        return str(device)


def check_graph(
    gm: GraphModule, impl: str, compile_launch: Optional[Callable[[Any, torch.device], Optional[str]]] = None
) -> dict[str, str]:
    """Compile, for its device, every Triton kernel the merge steps of ``gm`` launch; mark the ops
    whose kernel fails (``impl="auto"``: they fall back to PyTorch, one warning each) or raise
    :class:`~tomec.errors.KernelCompileError` (``impl="triton"``). Returns the failed ops and why.

    ``compile_launch(launch, device)`` compiles one launch (default :func:`compile_on_device`).
    """
    nodes = _step_nodes(gm)
    if impl == "torch" or not nodes or kernels.unavailable_reason() is not None:
        return {}
    device = _device(nodes[0])
    if device is None or device.type != "cuda":
        return {}
    from .kernels import aot

    compile_launch = compile_launch or compile_on_device
    launches = []
    with ignoring_broken_ops():  # record every kernel, the ones already known to fail included
        for node in nodes:
            args = map_arg(node.args, _value)
            kwargs = dict(map_arg(node.kwargs, _value), impl="triton")
            with aot.record() as recorded:
                node.target(*args, **kwargs)
            launches += recorded
    failed: dict[str, str] = {}
    for launch in launches:
        key = (str(device), _config_key(launch))
        if key not in _checked:
            _checked[key] = compile_launch(launch, device)
        error = _checked[key]
        if error is None or launch.op in failed:
            continue
        message = (
            f"tomec: the Triton kernel {launch.name} (torch.ops.tomec.{launch.op}) does not compile "
            f"for {_device_label(device)}: {error}"
        )
        if impl == "triton":
            raise KernelCompileError(message + "; impl='auto' would use the plain-PyTorch op instead")
        failed[launch.op] = message
        if launch.op not in broken_ops():
            text = message + "; using the plain-PyTorch op instead"
            warnings.warn(text, stacklevel=2)
            log.warning(text)
        mark_broken(launch.op, message)
    return failed
