"""Shared pieces of the op layer: supported dtypes, implementation choice, small helpers."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from tomec.errors import ConfigError, KernelCompileError, UnsupportedDtypeError

log = logging.getLogger("tomec")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IMPLS = ("torch", "triton", "auto")


def check_dtype(dtype: torch.dtype, where: str = "activations") -> None:
    """Raise :class:`UnsupportedDtypeError` unless ``dtype`` is one tomec has ops for."""
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise UnsupportedDtypeError(
            f"{where} are {str(dtype).replace('torch.', '')}; tomec supports {names}"
        )


_warned_fallback = False
# Triton ops whose kernel did not compile for a device here (tomec.kernel_check): op -> why.
_broken_ops: dict[str, str] = {}


def mark_broken(op: str, reason: str) -> None:
    """Record that the Triton op ``op`` (``"bipartite_match"``, ...) cannot run here: ``impl="auto"``
    takes the plain-PyTorch op for it from now on, ``impl="triton"`` raises ``reason``."""
    _broken_ops[op] = reason


def broken_ops() -> dict[str, str]:
    """The Triton ops marked as not compiling here, with the reason."""
    return dict(_broken_ops)


@contextlib.contextmanager
def ignoring_broken_ops() -> Iterator[None]:
    """Within the context, ops marked broken resolve as if they were not (to record their launches)."""
    saved = dict(_broken_ops)
    _broken_ops.clear()
    try:
        yield
    finally:
        _broken_ops.update(saved)


def resolve_impl(impl: str, device: torch.device, op: Optional[str] = None) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device`` (for the Triton op ``op``, if named).

    ``"auto"`` takes Triton for CUDA tensors when the kernels load, else PyTorch (with a one-time
    warning when CUDA tensors fall back); an op whose kernel failed to compile here
    (:func:`mark_broken`) takes PyTorch. ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``;
    for a broken op it raises :class:`~tomec.errors.KernelCompileError`.
    """
    global _warned_fallback
    if impl not in IMPLS:
        raise ConfigError(f"impl={impl!r} is not available; choose one of {IMPLS}")
    if impl == "torch":
        return impl
    from tomec import kernels

    reason = kernels.unavailable_reason()
    if op is not None and op in _broken_ops:
        if impl == "triton":
            raise KernelCompileError(_broken_ops[op])
        return "torch"
    if impl == "auto":
        if device.type != "cuda":
            return "torch"
        if reason is None:
            kernels.load()
            return "triton"
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"tomec: using the PyTorch ops on CUDA: {reason}", stacklevel=3)
            log.warning("tomec: using the PyTorch ops on CUDA: %s", reason)
        return "torch"
    if reason is not None:
        raise ConfigError(f"impl='triton' is not available: {reason}")
    if device.type == "cpu" and not kernels.interpreting():
        raise ConfigError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    kernels.load()
    return "triton"


def inv_norm(t: Tensor) -> Tensor:
    # The clamp only keeps an all-zero vector from turning into NaN.
    return 1.0 / t.norm(dim=-1).clamp_min(torch.finfo(t.dtype).tiny)


def descending_rank(score: Tensor) -> Tensor:
    """Position of each entry in a stable descending sort of the last axis (ties: lower index first).

    ``[B, n] -> [B, n]`` int64. Pairwise counting instead of ``sort`` + inverse permutation: one fused
    reduction under Inductor, exact, and no tie-order freedom.
    """
    n = score.shape[-1]
    idx = torch.arange(n, device=score.device)
    other, me = score.unsqueeze(-2), score.unsqueeze(-1)  # [B, 1, n] (j), [B, n, 1] (i)
    before = (other > me) | ((other == me) & (idx.view(1, 1, n) < idx.view(1, n, 1)))
    return before.sum(-1)


_autograd_registered: set[str] = set()


def register_vjp_autograd(op: str, reference: Callable[..., object], differentiable: Sequence[int]) -> None:
    """Give the Triton op ``op`` (``"tomec::name"``) the gradients of ``reference``, a PyTorch
    function of the same arguments that computes the same values.

    The backward is ``torch.func.vjp`` of ``reference`` with respect to the argument positions in
    ``differentiable`` (those that are tensors in the call), so AOTAutograd traces it into the
    compiled backward like any PyTorch code. Registered once per op.
    """
    if op in _autograd_registered:
        return

    def setup_context(ctx, inputs, output):
        ctx.tensor_slots = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))
        ctx.inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]

    def backward(ctx, *grads):
        inputs = list(ctx.inputs)
        for i, t in zip(ctx.tensor_slots, ctx.saved_tensors):
            inputs[i] = t
        wanted = [i for i in differentiable if isinstance(inputs[i], torch.Tensor)]

        def run(*tensors):
            args = list(inputs)
            for i, t in zip(wanted, tensors):
                args[i] = t
            return reference(*args)

        _, vjp = torch.func.vjp(run, *(inputs[i] for i in wanted))
        found = dict(zip(wanted, vjp(grads if len(grads) > 1 else grads[0])))
        return tuple(found.get(i) for i in range(len(inputs)))

    torch.library.register_autograd(op, backward, setup_context=setup_context)
    _autograd_registered.add(op)
