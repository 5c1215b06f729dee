"""The public entry: ``torch.compile(model, backend=tomec.backend(method="tome", r=100))``."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch.fx import GraphModule

from . import methods
from .config import TomecConfig
from .errors import ConfigError

__all__ = ["backend", "TomecBackend", "tomec_dynamo_backend"]

log = logging.getLogger("tomec")


def _inductor_patches(mode: Optional[str], options: Optional[Mapping[str, Any]], dynamic: Any) -> dict:
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    patches: dict[str, Any] = {}
    if mode and mode != "default":
        patches.update(list_mode_options(mode, dynamic))
    for key, value in (options or {}).items():
        if not hasattr(inductor_config, key.split(".")[0]):
            raise ConfigError(f"unknown Inductor option {key!r} in options=")
        patches[key] = value
    return patches


class TomecBackend:
    """A Dynamo backend that rewrites each traced graph with token merging, then compiles it.

    After compilation, ``schedule`` holds the resolved per-block counts of the last graph and
    ``report()`` what the passes did; ``tokens_per_block`` the token count entering each block's
    attention, read off the validated graph; with ``trace_source=True``, ``last_info`` holds the source map
    (``[B, N0]`` int64, the final slot of every original token) and sizes (``[B, N_out, 1]``) of the
    last call.
    """

    __name__ = "tomec"

    def __init__(self, config: TomecConfig) -> None:
        self.config = config
        self.schedule: Optional[list[int]] = None
        self.protected: Optional[int] = None
        self.tokens_per_block: Optional[list[int]] = None
        self._graph_break: Optional[str] = None  # the last graph break a graph of this model ended at
        self._tokens_out: Optional[int] = None  # the tokens the last block graph passed on
        self.last_info: Optional[dict[str, Any]] = None
        self.compile_seconds: list[float] = []
        self._reports: list[str] = []

    def __repr__(self) -> str:
        return f"tomec.backend({self.config})"

    def report(self) -> str:
        """What the passes did to each graph compiled so far: blocks rewritten, candidates skipped."""
        if not self._reports:
            return "tomec: nothing compiled yet"
        return "\n".join(f"[graph {i}] {r}" for i, r in enumerate(self._reports))

    def __call__(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        mode: Optional[str] = None,
        options: Optional[Mapping[str, Any]] = None,
    ) -> Callable:
        from tomec.passes import ModelContext, rewrite

        from .frames import current_frame

        start = time.perf_counter()
        context = ModelContext(current_frame(), self._graph_break, self._tokens_out)
        result = rewrite(gm, example_inputs, self.config, context)
        self._graph_break = result.graph_break or self._graph_break
        self._reports.append(result.report.text())
        if result.plan is not None:
            self._tokens_out = result.plan.tokens_out
            self.schedule = list(result.plan.schedule)
            self.protected = result.plan.protected
            self.tokens_per_block = result.tokens_per_block
            from .kernel_check import check_graph

            check_graph(result.gm, self.config.impl)  # CUDA graphs only: each kernel compiles there
        if self.config.compiler == "eager":
            compiled = result.gm.forward
        else:
            from torch._inductor.compile_fx import compile_fx

            patches = _inductor_patches(mode, options, dynamic=None)
            compiled = compile_fx(result.gm, list(example_inputs), config_patches=patches or None)
        self.compile_seconds.append(time.perf_counter() - start)
        if result.extra_outputs:
            return self._strip_extra_outputs(compiled, result.num_outputs, result.plan)
        return compiled

    def _strip_extra_outputs(self, compiled: Callable, num_outputs: int, plan: Any) -> Callable:
        schedule = list(plan.schedule)

        def run(*args: Any) -> Any:
            # Dynamo calls backends unboxed; compile_fx's result takes *args too, whatever
            # its _boxed_call attribute says.
            outs = compiled(*args)
            source, size = outs[num_outputs], outs[num_outputs + 1]
            self.last_info = {
                "source": source.clone(),
                "size": size.clone(),
                "num_protected": plan.protected,
                "schedule": schedule,
            }
            return tuple(outs[:num_outputs])

        return run


def backend(
    method: str = "tome",
    r: Optional[int] = None,
    inflect: float = -0.5,
    schedule: Any = None,
    prop_attn: bool = True,
    protect: Union[str, int] = "auto",
    trace_source: bool = False,
    compiler: str = "inductor",
    strict: bool = True,
    prop_attn_impl: str = "auto",
    impl: str = "auto",
    **method_options: Any,
) -> TomecBackend:
    """A token-merging backend for ``torch.compile``.

    Args:
        method: merging method (``tomec.methods.available()`` lists them).
        r: total tokens removed over the whole network (``r=100`` on DeiT-S: 197 -> 97 tokens).
        inflect: in [-1, 1]; how ``r`` is spread over blocks (0 constant, < 0 more in early blocks).
        schedule: instead of ``r``: a per-block list, a ToMe-style ``(r_per_layer, inflect)`` tuple
            or ``tomec.schedule.keep_ratio(ratio)``.
        prop_attn: add ``log(size)`` to the attention logits of later blocks (proportional attention).
        protect: leading tokens that never merge; ``"auto"`` counts the CLS/distillation/register
            tokens concatenated before the first block.
        trace_source: track which original tokens every final token holds (``backend.last_info``).
        compiler: ``"inductor"``, or ``"eager"`` to run the rewritten graph without compiling it.
        strict: a graph without attention blocks is an error (``False``: compiled unchanged, with a
            warning).
        prop_attn_impl: ``"auto"``, ``"mask"`` (SDPA float mask), ``"manual"`` (explicit chain),
            ``"extra_dim"`` or ``"flex"``.
        impl: ``"auto"`` (CUDA graphs get the Triton kernels, each checked to compile for the device
            first; one that does not falls back to its plain-PyTorch op with a warning),
            ``"triton"`` (the kernels or an error) or ``"torch"`` (plain PyTorch everywhere).
        **method_options: options of the chosen method (unknown names are an error).

    Returns:
        A callable to pass as ``torch.compile(model, backend=...)``; ``mode=``/``options=`` of
        ``torch.compile`` are forwarded to Inductor.
    """
    return TomecBackend(
        TomecConfig(
            method=method, r=r, inflect=inflect, schedule=schedule, prop_attn=prop_attn,
            protect=protect, trace_source=trace_source, compiler=compiler, strict=strict,
            prop_attn_impl=prop_attn_impl, impl=impl, method_options=method_options,
        )
    )


def _backend_from_options(options: Mapping[str, Any]) -> tuple[TomecBackend, dict[str, Any]]:
    """Split ``torch.compile(..., backend="tomec", options=...)`` into tomec's settings, the method's
    options and Inductor's; a key that is none of these is an error that lists the valid names."""
    import torch._inductor.config as inductor_config

    options = dict(options)
    names = TomecConfig.field_names() - {"method_options"}
    method = methods.get(options.get("method", "tome"))
    ours = {k: options.pop(k) for k in list(options) if k in names}
    method_options = {k: options.pop(k) for k in list(options) if k in method.options.names()}
    if ours.get("trace_source"):
        raise ConfigError(
            'trace_source=True in backend="tomec" options= leaves no backend object to read last_info '
            "from; pass backend=tomec.backend(..., trace_source=True) and read backend.last_info"
        )
    for key in options:
        others = [m for m in methods.available() if key in methods.get(m).options.names()]
        if others:
            raise ConfigError(
                f"option {key!r} belongs to method(s) {others}, not to {method.name!r}, whose options "
                f"are {sorted(method.options.names()) or 'none'}"
            )
        if not hasattr(inductor_config, key.split(".")[0]):
            raise ConfigError(
                f"unknown option {key!r} in options=: tomec's are {sorted(names)}; method "
                f"{method.name!r}'s are {sorted(method.options.names()) or 'none'}; any other key must be an "
                f"Inductor option (torch._inductor.list_options())"
            )
    if options and ours.get("compiler") == "eager":
        raise ConfigError(
            f"Inductor options {sorted(options)} with compiler='eager' would do nothing: drop them or "
            f"compile with Inductor"
        )
    return backend(**ours, **method_options), options


# One TomecBackend per torch.compile call of the named backend: Dynamo passes the same options dict
# for every graph of a model, and the graphs of one model share what the backend learnt (a graph
# break, the block graph before a head graph). The dict is held so that its id stays its own.
_NAMED_BACKENDS: dict[int, tuple[Mapping[str, Any], TomecBackend, dict[str, Any]]] = {}


def tomec_dynamo_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    mode: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> Callable:
    """The backend registered as ``"tomec"``: ``torch.compile(m, backend="tomec",
    options={"method": "tome", "r": 100})``. Keys that are tomec's (or the method's) options configure
    tomec; any other must be an Inductor option (unknown keys are an error listing the valid names)."""
    options = options if options is not None else {}
    entry = _NAMED_BACKENDS.get(id(options))
    if entry is None or entry[0] is not options:
        be, inductor_options = _backend_from_options(options)
        if len(_NAMED_BACKENDS) >= 64:
            _NAMED_BACKENDS.pop(next(iter(_NAMED_BACKENDS)))
        entry = _NAMED_BACKENDS[id(options)] = (options, be, inductor_options)
    _, be, inductor_options = entry
    return be(gm, example_inputs, mode=mode, options=inductor_options)
