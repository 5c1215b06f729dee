"""The eager reference: token merging patched into timm models, module by module.

``patch(model, "tome", r=100)`` swaps the classes of timm's ``Block`` and ``Attention`` instances for
subclasses that merge after the attention residual, like ToMe's own patch, but keeps what timm's
modules do (LayerScale, q/k norm, the attention output norm and gate, fused attention: SDPA with the
``log(size)`` mask): their forward is the one timm ViT forward training shares
(:mod:`tomec.train.vit`). It runs the same op layer as the compiled path and is its parity oracle; it
is also the eager path for users. Average pooling over tokens becomes size-weighted, as in the pass.
The class swapping (:func:`swap_class`, :func:`patch_pool`, :func:`unpatch`) also serves the
training patches (DTEM's soft merging).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import Tensor, nn

from .config import TomecConfig
from .errors import UnsupportedModelError
from .methods import merge_step, merge_step_ahead
from .train import vit

__all__ = ["patch", "unpatch", "state", "ReferenceState", "swap_class", "patch_pool"]


@dataclass
class ReferenceState:
    """What the patched model tracks during a forward pass (reset at the first block)."""

    config: TomecConfig
    num_layers: int
    protected: int
    schedule: Optional[list[int]] = None
    num_tokens: Optional[int] = None
    size: Optional[Tensor] = None
    source: Optional[Tensor] = None
    tokens_per_block: list[int] = field(default_factory=list)

    def begin(self, num_tokens: int) -> None:
        if self.schedule is None or self.num_tokens != num_tokens:
            self.schedule = self.config.resolve_schedule(self.num_layers, num_tokens, self.protected)
            self.num_tokens = num_tokens
        self.size, self.source, self.tokens_per_block = None, None, []


def _attention_forward(
    self: nn.Module, x: Tensor, size: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
    is_causal: bool = False, probs: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """timm ``Attention.forward`` plus the ``log(size)`` bias (:func:`tomec.train.vit.attention`);
    also returns the keys and queries ``[B, H, N, d]`` that enter attention. ``probs [B, H, N, N]``:
    the attention map to apply to the values instead of computing one (a merged one-step-ahead map)."""
    if attn_mask is not None or is_causal:
        raise UnsupportedModelError("the tomec reference does not merge under attention masks")
    out, q, k, _ = vit.attention(self, x, size, probs=probs)
    return out, k, q


def _learned_params(
    st: ReferenceState, layer: int, attn_in: Tensor, k: Tensor
) -> Optional[dict[str, Tensor]]:
    """The block's learned tensors (``Method.params``) on the tokens' device and dtype, as the
    compiled path registers them."""
    method = st.config.method_spec
    if method.params is None:
        return None
    tensors = method.params(
        st.config.method_options, layer=layer, num_layers=st.num_layers,
        channels=attn_in.shape[-1], head_dim=k.shape[-1],
    )
    return {name: t.to(device=attn_in.device, dtype=attn_in.dtype) for name, t in tensors.items()}


def _block_forward(
    self: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False
) -> Tensor:
    st: ReferenceState = self._tomec_state
    layer: int = self._tomec_layer
    if layer == 0:
        st.begin(x.shape[1])
    st.tokens_per_block.append(x.shape[1])
    config, method, r = st.config, st.config.method_spec, st.schedule[layer]
    size = st.size if config.prop_attn else None
    attn_in = self.norm1(x)
    site = config.site
    if r > 0 and site == "ahead":  # merge the input with this block's attention, then run it merged
        _, k, q = self.attn(attn_in, size=size, attn_mask=attn_mask, is_causal=is_causal)
        x, st.size, st.source, probs = merge_step_ahead(
            x, st.size, st.source, k, q, method=method.name, r=r, protected=st.protected,
            layer=layer, num_layers=st.num_layers, scale=self.attn.scale, prop_attn=config.prop_attn,
            trace_source=config.trace_source, options=config.method_options,
        )
        attn_in = self.norm1(x)
        attn_out, _, _ = self.attn(attn_in, probs=probs)
        return vit.mlp_residual(self, vit.attention_residual(self, x, attn_out))
    attn_out, k, q = self.attn(attn_in, size=size, attn_mask=attn_mask, is_causal=is_causal)
    x = vit.attention_residual(self, x, attn_out)
    if (r > 0 or method.reorders_at_r0) and site == "attention":
        x, st.size, st.source = merge_step(
            x, st.size, st.source, k, q, method=method.name, r=r, protected=st.protected,
            layer=layer, num_layers=st.num_layers, scale=self.attn.scale,
            prop_attn=config.prop_attn, trace_source=config.trace_source,
            options=config.method_options, attn_in=attn_in,
            params=_learned_params(st, layer, attn_in, k),
        )
    x = vit.mlp_residual(self, x)
    if r > 0 and site == "block":
        x = method.transform(x, r, st.protected)
    return x


def _pool(self: nn.Module, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
    """timm ``VisionTransformer.pool`` with the token average weighted by the sizes the patched
    forward tracks (``self._tomec_state.size``)."""
    return vit.pool(self, x, self._tomec_state.size, pool_type)


_SUBCLASSES: dict[tuple[type, str], type] = {}


def swap_class(module: nn.Module, methods: dict[str, Any], tag: str) -> None:
    """Give ``module`` a subclass of its class (one per class and ``tag``, cached) whose ``methods``
    replace the class's; :func:`unpatch` restores the class."""
    base = type(module)
    key = (base, tag)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Tomec{base.__name__}", (base,), dict(methods, _tomec_base=base))
    module.__class__ = _SUBCLASSES[key]


def patch_pool(model: nn.Module) -> None:
    """A timm ``VisionTransformer``'s pooling, from now on size-weighted (:func:`tomec.train.vit.pool`)
    by the sizes in ``model._tomec_state.size``; other models are left as they are."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        swap_class(model, {"pool": _pool}, "vit")


def patch(
    model: nn.Module,
    method: str = "tome",
    *,
    r: Optional[int] = None,
    inflect: float = -0.5,
    schedule: Any = None,
    prop_attn: bool = True,
    protect: Union[str, int] = "auto",
    trace_source: bool = False,
    **method_options: Any,
) -> nn.Module:
    """Patch a timm ViT (or any module holding timm ``Block``s) in place; returns the model.

    Arguments mean what they mean for :func:`tomec.backend`. ``protect="auto"`` takes the model's
    ``num_prefix_tokens`` (CLS, distillation token, registers), or 0 for a bare block stack.
    After a forward pass, :func:`state` gives the schedule, sizes and (with ``trace_source``) the
    source map.
    """
    config = TomecConfig(
        method=method, r=r, inflect=inflect, schedule=schedule, prop_attn=prop_attn,
        protect=protect, trace_source=trace_source, compiler="eager", method_options=method_options,
    )
    if hasattr(model, "_tomec_state"):
        unpatch(model)
    blocks = vit.timm_blocks(model, "the reference patch", advice="use the tomec backend for other models")
    if protect == "auto":
        protected = int(getattr(model, "num_prefix_tokens", 0))
    else:
        protected = int(protect)
    st = ReferenceState(config=config, num_layers=len(blocks), protected=protected)
    model._tomec_state = st
    for layer, b in enumerate(blocks):
        b._tomec_state, b._tomec_layer = st, layer
        swap_class(b, {"forward": _block_forward}, "block")
        swap_class(b.attn, {"forward": _attention_forward}, "attn")
    patch_pool(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (classes restored, state removed)."""
    for m in model.modules():
        base = getattr(type(m), "_tomec_base", None)
        if base is not None:
            m.__class__ = base
        for attr in ("_tomec_state", "_tomec_layer"):
            if attr in m.__dict__:
                delattr(m, attr)
    return model


def state(model: nn.Module) -> ReferenceState:
    """The state of a patched model (schedule, sizes, source map of the last forward)."""
    st = getattr(model, "_tomec_state", None)
    if st is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not patched by tomec.reference")
    return st
