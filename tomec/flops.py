"""MACs per image of a ViT under a merge schedule: measured, and the hand formula of METHODS.md.

:func:`flops_report` (``tomec flops``) is the measured count: the model is built (or copied) on the
``meta`` device, traced by Dynamo and rewritten by the tomec backend itself (``compiler="eager"``),
and ``torch.utils.flop_counter.FlopCounterMode`` counts the graph before the rewrite (the unmerged
model) and after it (the merged one: the merge steps' own matmuls and what a method adds, such as
MCTF's one-step-ahead branch, are in it). FlopCounterMode counts FLOPs, 2 per multiply-accumulate
of a matmul or convolution; the report gives MACs, its FLOPs / 2 (elementwise ops, norms and softmax
count nothing, as in fvcore and the papers' tables). Whatever the model is (a hybrid's ResNet stem
included), the stem, the blocks and the head add up to the total, and a model the backend refuses
is refused with the backend's own error.

The hand formula (:func:`block_macs`, :func:`per_block_macs`, :func:`vit_macs`,
:func:`ideal_speedup`; ``flops_report(..., measure=False)``) counts a plain ViT's blocks: a block
costs ``4·N·C² + 2·N²·C`` for attention on its ``N`` input tokens plus ``2·m·N_out·C²`` for the MLP
(ratio ``m``, 4 by default) on its ``N_out = N - r`` tokens (``N`` for a method that reduces after
the MLP, such as DCT); add the patch embedding's projection. It is what a differentiable search
needs (tensors stay tensors) and reproduces ToMe's DeiT-S figures (4.6 GMACs unmerged; 3.4 / 2.7 /
2.3 at r = 8 / 13 / 16 per block), but it knows nothing of a stem other than one patch projection,
of the head, or of the merge steps. The ideal speedup of a schedule is the ratio of the unmerged to
the merged total.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

__all__ = ["block_macs", "vit_macs", "ideal_speedup", "ViTDims", "vit_dims", "flops_report"]


def block_macs(n_in: Any, n_out: Any, dim: int, mlp_ratio: float = 4.0) -> Any:
    """MACs of one block that receives ``n_in`` tokens and passes ``n_out`` to its MLP (an int for
    int counts; tensors stay tensors, so a search can differentiate through the counts)."""
    macs = 4 * n_in * dim**2 + 2 * n_in**2 * dim + 2 * mlp_ratio * n_out * dim**2
    return int(macs) if isinstance(n_in, int) and isinstance(n_out, int) else macs


def per_block_macs(
    num_tokens: int, schedule: Sequence[int], dim: int, mlp_ratio: float = 4.0, site: str = "attention"
) -> list[int]:
    """MACs of every block; ``site="block"``: the reduction follows the MLP (DCT); ``site="ahead"``:
    at the block's input, one step ahead (MCTF): q, k and their map on the ``n`` unmerged tokens,
    the values, the map's product and the output projection on the ``n - r`` merged ones (what the
    official code computes; tomec's graph still runs a fused qkv projection whole on both token
    sets, ``n·C² + 2·(n − r)·C²`` more per merging block)."""
    out, n = [], num_tokens
    for r in schedule:
        if site == "ahead" and r > 0:
            m = n - r
            out.append(2 * n * dim * dim + n * n * dim + 2 * m * dim * dim + m * m * dim
                       + int(2 * mlp_ratio * m * dim * dim))
        else:
            out.append(block_macs(n, n if site == "block" else n - r, dim, mlp_ratio))
        n -= r
    return out


def vit_macs(
    num_tokens: int,
    schedule: Sequence[int],
    dim: int,
    *,
    mlp_ratio: float = 4.0,
    patch_macs: int = 0,
    site: str = "attention",
) -> int:
    """MACs per image: the blocks under ``schedule`` plus ``patch_macs``."""
    return patch_macs + sum(per_block_macs(num_tokens, schedule, dim, mlp_ratio, site))


def ideal_speedup(num_tokens: int, schedule: Sequence[int], dim: int, **kwargs: Any) -> float:
    """Unmerged MACs over merged MACs for the same model."""
    merged = vit_macs(num_tokens, schedule, dim, **kwargs)
    return vit_macs(num_tokens, [0] * len(schedule), dim, **kwargs) / merged


@dataclass(frozen=True)
class ViTDims:
    """What the FLOP model needs to know of a ViT."""

    num_blocks: int
    dim: int
    num_tokens: int  # entering the first block, protected ones included
    protected: int
    mlp_ratio: float
    patch_macs: int


def vit_dims(model: Any) -> ViTDims:
    """Read the dimensions of a timm ``VisionTransformer`` (works on a ``meta``-device model)."""
    blocks = getattr(model, "blocks", None)
    patch = getattr(model, "patch_embed", None)
    if blocks is None or patch is None or not hasattr(model, "embed_dim"):
        from .errors import UnsupportedModelError

        raise UnsupportedModelError(f"{type(model).__name__} is not a timm VisionTransformer-like model")
    dim = int(model.embed_dim)
    protected = int(getattr(model, "num_prefix_tokens", 0))
    return ViTDims(
        num_blocks=len(blocks),
        dim=dim,
        num_tokens=int(patch.num_patches) + protected,
        protected=protected,
        mlp_ratio=blocks[0].mlp.fc1.out_features / dim,
        patch_macs=int(patch.proj.weight.numel()) * int(patch.num_patches),
    )


def flops_report(
    model: Any,
    method: str = "tome",
    r: Optional[int] = None,
    inflect: float = -0.5,
    schedule: Any = None,
    *,
    measure: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Schedule, tokens per block, MACs per block and in total, and the ideal speedup.

    ``model``: a timm name (built on the ``meta`` device: no weights) or a model (copied onto the
    ``meta`` device; its weights are neither copied nor run). ``options``: method options, and any
    other ``tomec.backend`` setting (``compiler`` and ``trace_source`` are ignored: the count traces
    with ``compiler="eager"``). ``measure=True``: the backend's rewritten graph, counted by
    FlopCounterMode (see the module docstring); a model or setting the backend refuses raises the
    backend's error. ``measure=False``: the hand formula from the model's dimensions alone (fast;
    a plain ViT only).

    Keys: ``method``, ``schedule``, ``protected``, ``dim``, ``tokens_in`` (per block),
    ``tokens_out``, ``block_macs`` (per block), ``patch_macs`` (the patch embedding, a hybrid's
    backbone included), ``other_macs`` (the rest: pre/final norms, pooling, head), ``macs`` (their
    sum), ``unmerged_macs``, ``unmerged_block_macs`` and ``ideal_speedup``.
    """
    import dataclasses

    from .config import TomecConfig

    settings = {f.name for f in dataclasses.fields(TomecConfig)} - {"method_options"}
    method_options = {k: v for k, v in options.items() if k not in settings}
    backend_settings = {k: v for k, v in options.items() if k in settings}
    if measure:
        # learned tensors (heads=, adapter=) stay as given: the backend moves them to the graph's device
        backend_settings.update(compiler="eager", trace_source=False)
    config = TomecConfig(method=method, r=r, inflect=inflect, schedule=schedule,
                         method_options=method_options, **backend_settings)
    if isinstance(model, str):
        import timm
        import torch

        with torch.device("meta"):
            model = timm.create_model(model, pretrained=False)
    elif measure:
        model = _to_meta(model)
    if measure:
        return _measured_report(model.eval(), config)
    return _formula_report(model, config)


def _formula_report(model: Any, config: Any) -> dict[str, Any]:
    dims = vit_dims(model)
    protected = config.protect if isinstance(config.protect, int) else dims.protected
    plan = config.resolve_schedule(dims.num_blocks, dims.num_tokens, protected)
    site = config.site
    tokens, n = [], dims.num_tokens
    for v in plan:
        tokens.append(n)
        n -= v
    blocks = per_block_macs(dims.num_tokens, plan, dims.dim, dims.mlp_ratio, site)
    unmerged = per_block_macs(dims.num_tokens, [0] * len(plan), dims.dim, dims.mlp_ratio, site)
    total = dims.patch_macs + sum(blocks)
    base = dims.patch_macs + sum(unmerged)
    return {
        "method": config.method, "schedule": plan, "tokens_in": tokens, "tokens_out": n,
        "protected": protected, "dim": dims.dim, "block_macs": blocks,
        "patch_macs": dims.patch_macs, "other_macs": 0, "macs": total, "unmerged_macs": base,
        "unmerged_block_macs": unmerged, "ideal_speedup": base / total,
    }


def _to_meta(model: Any) -> Any:
    """A copy of ``model`` whose parameters and buffers are empty ``meta`` tensors (nothing of its
    weights is copied; ``model`` itself is left as it is)."""
    import torch
    from torch import nn

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _image_input(model: Any) -> Any:
    """A ``[1, C, H, W]`` meta input of the model's own image size."""
    import torch

    patch = getattr(model, "patch_embed", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = getattr(patch, "img_size", None) or tuple(cfg.get("input_size", (3, 224, 224))[1:])
    size = (size, size) if isinstance(size, int) else tuple(size)
    chans = getattr(patch, "in_chans", None) or getattr(getattr(patch, "proj", None), "in_channels", None)
    chans = chans or cfg.get("input_size", (3,))[0]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.empty(1, int(chans), *map(int, size), device="meta", dtype=dtype)


def _module_path(entry: str) -> str:
    """A Dynamo ``nn_module_stack`` name (``L['self'].blocks.3.attn``) as a module path (``blocks.3.attn``)."""
    entry = re.sub(r"\._modules\['([^']*)'\]", r".\1", entry)
    entry = re.sub(r"\[(\d+)\]", r".\1", entry)
    return re.sub(r"^L\['self'\]\.?|^L__self__\.?", "", entry)


def _labeler(model: Any) -> Callable[[Any], Optional[str]]:
    """Node -> ``"block:<i>"``, ``"patch"``, ``"other"``, or None for a node no module owns (one the
    passes inserted: it takes the label of the node before it)."""
    names = {id(m): name for name, m in model.named_modules()}
    blocks = names.get(id(getattr(model, "blocks", None)))
    patch = names.get(id(getattr(model, "patch_embed", None)))

    def label(node: Any) -> Optional[str]:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        for entry in stack.values():
            path = _module_path(entry[0] if isinstance(entry, tuple) else str(entry))
            if blocks is not None:
                m = re.match(rf"^{re.escape(blocks)}\.(\d+)(\.|$)", path)
                if m:
                    return f"block:{m.group(1)}"
            if patch is not None and (path == patch or path.startswith(patch + ".")):
                return "patch"
        return "other"

    return label


def _count_graph(
    gm: Any, inputs: Sequence[Any], label: Callable[[Any], Optional[str]]
) -> tuple[dict[str, int], Any]:
    """FLOPs of one run of ``gm`` on ``inputs`` under FlopCounterMode, by :func:`_labeler` label
    (a node no module owns counts with the node before it), and the graph's outputs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counts: dict[str, int] = {}

    class Counter(torch.fx.Interpreter):
        current = "other"

        def run_node(self, node: Any) -> Any:
            self.current = label(node) or self.current
            before = mode.get_total_flops()
            out = super().run_node(node)
            spent = mode.get_total_flops() - before
            if spent:
                counts[self.current] = counts.get(self.current, 0) + spent
            return out

    mode = FlopCounterMode(display=False)
    with mode, torch.no_grad():
        outputs = Counter(gm).run(*inputs)
    if sum(counts.values()) != mode.get_total_flops():
        raise AssertionError("tomec.flops: FLOPs counted outside the graph's nodes")
    return counts, outputs


def _measured_report(model: Any, config: Any) -> dict[str, Any]:
    import torch
    from torch.fx import GraphModule

    from .api import TomecBackend
    from .errors import TomecError, UnsupportedModelError

    if getattr(model, "blocks", None) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `blocks`: tomec.flops counts per block of a ViT"
        )
    be = TomecBackend(config)
    label = _labeler(model)
    graphs: list[tuple[dict[str, int], dict[str, int]]] = []

    def counting_backend(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        before, _ = _count_graph(gm, example_inputs, label)  # first: the rewrite works in place
        compiled = be(gm, example_inputs)
        rewritten = getattr(compiled, "__self__", None)  # compiler="eager": the graph's forward
        if not isinstance(rewritten, GraphModule):
            raise TypeError(f"tomec.flops: the backend returned {compiled!r}, not a graph's forward")
        after, outputs = _count_graph(rewritten, example_inputs, label)
        graphs.append((before, after))
        return lambda *args: outputs  # the meta outputs of the run just counted: no second run

    x = _image_input(model)
    # dynamic=False: a frame Dynamo compiled before for other shapes (another model of the same class)
    # would otherwise come back with symbolic sizes; the count is of this model's static shapes
    for attempt in range(2):
        try:
            with torch.no_grad():
                torch.compile(model, backend=counting_backend, dynamic=False)(x)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, TomecError):
                raise inner from None
            raise
        if graphs or attempt:
            break
        torch._dynamo.reset()  # Dynamo ran the frame from its cache (or past its recompile limit)
    if be.schedule is None or len(graphs) != 1:
        raise UnsupportedModelError(
            f"tomec.flops: the backend rewrote {'no graph' if be.schedule is None else 'more than one graph'} "
            f"of {type(model).__name__}; what it did:\n{be.report()}"
        )
    (base, merged), = graphs
    plan, tokens = list(be.schedule), list(be.tokens_per_block)

    def macs(flops: dict[str, int]) -> tuple[list[int], int, int]:
        """Per block, the patch embedding, the rest (a block the pass did not count included)."""
        flops = dict(flops)
        blocks = [flops.pop(f"block:{i}", 0) // 2 for i in range(len(plan))]
        patch = flops.pop("patch", 0) // 2
        return blocks, patch, sum(flops.values()) // 2

    blocks, patch, other = macs(merged)
    base_blocks, base_patch, base_other = macs(base)
    total, unmerged = patch + sum(blocks) + other, base_patch + sum(base_blocks) + base_other
    return {
        "method": config.method, "schedule": plan, "tokens_in": tokens,
        "tokens_out": tokens[-1] - plan[-1], "protected": be.protected, "dim": int(getattr(model, "embed_dim", 0)),
        "block_macs": blocks, "patch_macs": patch, "other_macs": other, "macs": total,
        "unmerged_macs": unmerged, "unmerged_block_macs": base_blocks, "ideal_speedup": unmerged / total,
    }
