"""Shared test fixtures: small random-weight timm models, images, and parity measurement."""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Iterator

import pytest
import timm
import torch
from torch import nn

import tomec
from tomec import reference
from tomec.bench.inductor_aot import dynamo_graph
from tomec.errors import TomecError

IMAGE_SIZE = {"test_vit": 160, "deit_tiny_patch16_224": 224}
TOLERANCE = 1e-4  # max abs error relative to the logits' scale (fp32)
R = {"test_vit": 40, "deit_tiny_patch16_224": 80}


def make_model(name: str = "test_vit", fused: bool = True, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A random-weight timm model in eval mode; ``fused=False`` builds the manual attention chain."""
    previous = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(fused)
    try:
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    finally:
        timm.layers.set_fused_attn(previous)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            assert m.fused_attn == fused
    return model


def images(name: str, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = IMAGE_SIZE.get(name, 224)
    return torch.randn(batch, 3, side, side, generator=g)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference logits' scale (the issue's parity measure)."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def compile_tomec(model: nn.Module, **kwargs: Any) -> tuple[Any, tomec.TomecBackend]:
    torch._dynamo.reset()
    be = tomec.backend(**kwargs)
    return torch.compile(model, backend=be, fullgraph=True), be


def compile_error(model, x, **kwargs) -> TomecError:
    """Compile and run; return the tomec error Dynamo wrapped (BackendCompilerFailed)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=tomec.backend(**kwargs), fullgraph=True)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        with torch.no_grad():
            compiled(x)
    inner = info.value.inner_exception
    assert isinstance(inner, TomecError), repr(inner)
    return inner


def _backend_only_keywords() -> frozenset[str]:
    """Keywords of ``tomec.backend`` that ``tomec.reference.patch`` does not take (how the graph is
    compiled and run: ``compiler``, ``strict``, ``prop_attn_impl``, ``impl``); every other keyword,
    method options included, means the same on both sides."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    backend = inspect.signature(tomec.backend).parameters
    patch = inspect.signature(reference.patch).parameters
    return frozenset(k for k, p in backend.items() if p.kind in named and k not in patch)


def reference_of(model: nn.Module, **kwargs: Any) -> nn.Module:
    """The eager reference patch on a copy of ``model`` (same weights), given the keywords of a
    ``tomec.backend`` call: those only the backend takes are left out, the rest (schedule, method
    and its options) passed on."""
    skip = _backend_only_keywords()
    return reference.patch(copy.deepcopy(model), **{k: v for k, v in kwargs.items() if k not in skip})


@contextlib.contextmanager
def uninitialized_memory_poisoned() -> Iterator[None]:
    """torch's deterministic mode: every uninitialized allocation (``empty``, ``empty_like``, ...) is
    filled with NaN (integers: the largest value), and ops torch knows to be nondeterministic raise.
    Running an op again inside it catches reads of memory the op never wrote, which a plain second
    call in the same process usually does not (the memory holds the same stale values)."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def tie_metric(batch: int, n: int, seed: int) -> torch.Tensor:
    """Tokens with exactly four ones out of 16: norms are exactly 2, every score is exact, and many
    scores tie, so tie-breaking is tested without rounding noise."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(batch, n, 16, dtype=torch.float64)
    for b in range(batch):
        for i in range(n):
            m[b, i, torch.randperm(16, generator=g)[:4]] = 1.0
    return m


def random_map(batch: int, n: int, n_out: int, n_dropped: int, seed: int) -> torch.Tensor:
    """Any destination map: every slot non-empty, ``n_dropped`` tokens at -1."""
    g = torch.Generator().manual_seed(seed)
    dest = torch.empty(batch, n, dtype=torch.int64)
    for b in range(batch):
        perm = torch.randperm(n, generator=g)
        row = torch.randint(0, n_out, (n,), generator=g)
        row[perm[:n_out]] = torch.randperm(n_out, generator=g)
        row[perm[n_out : n_out + n_dropped]] = -1
        dest[b] = row
    return dest


def trace(model, x):
    """The Dynamo FX graph of ``model(x)`` and its example inputs."""
    return dynamo_graph(model, x)


def check_parity(name, fused, batch, prop_attn=True, compiler="eager", method="tome", r=None,
                 trace_source=False, depth=None, **kwargs):
    """Compiled tomec against the eager reference on a random-weight model: schedule, tokens per
    block, logits within TOLERANCE, the merge really changes the answer, equal source maps.
    ``depth``: fewer blocks than the model's own (shorter Inductor compiles)."""
    model = make_model(name, fused, **({} if depth is None else {"depth": depth}))
    x = images(name, batch)
    r = R[name] if r is None else r
    compiled, be = compile_tomec(model, method=method, r=r, prop_attn=prop_attn, compiler=compiler,
                                 trace_source=trace_source, **kwargs)
    # the same schedule, method options and protect= on the reference (compiler-only keywords left out)
    ref = reference_of(model, method=method, r=r, prop_attn=prop_attn, trace_source=trace_source, **kwargs)
    with torch.no_grad():
        out, expect, plain = compiled(x), ref(x), model(x)
    st = reference.state(ref)
    assert be.schedule == st.schedule and sum(be.schedule) == r
    # tokens entering each block: the rewritten graph's shapes, the reference's, the schedule's
    expected_tokens = [st.tokens_per_block[0] - sum(be.schedule[:i]) for i in range(len(be.schedule))]
    assert be.tokens_per_block == st.tokens_per_block == expected_tokens
    err = relative_error(out, expect)
    assert err <= TOLERANCE, f"relative error {err:.2e} against the reference"
    if r > 0:  # the merge is really there: the unmerged model answers differently
        assert relative_error(out, plain) > 100 * TOLERANCE
    if trace_source:
        assert torch.equal(be.last_info["source"], st.source)
    return model, compiled, be, ref, x


class GatedAttention(timm.layers.Attention):
    """timm's ``Attention`` with its output gate (``gated=True``: ``sigmoid(gate(x))`` times the
    attention output, before the projection)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, gated=True, **kwargs)


def make_gated_model(name: str = "test_vit", fused: bool = True, seed: int = 0, **kwargs: Any) -> nn.Module:
    """:func:`make_model` with gated attention in every block, the gates' weights spread (×20) so that
    a gate differs from token to token and from 1/2 (timm's init leaves it near 1/2 everywhere)."""
    model = make_model(name, fused, seed, attn_layer=GatedAttention, **kwargs)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.gate.weight.mul_(20.0)
    return model
