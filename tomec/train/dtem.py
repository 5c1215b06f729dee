"""DTEM's learned heads: their forms, save/load, and training by soft merging (backbone frozen).

    heads = tomec.train.dtem.train_heads(model, (x_train, y_train), r=48, steps=300)
    heads.save("heads.pt")
    fast = torch.compile(model, backend=tomec.backend(method="dtem", r=48, heads="heads.pt"))

A head is ``nn.Linear(C, d_m)`` per attention block (``d_m`` = the head width ``d``, or ``2d`` for
``C >= 1024``; no norm or activation), reading the tokens that enter the block's attention
projections, as in the official code (movinghoon/DTEM). ``heads=`` accepts a path to a saved state
dict, a state dict (``"{block}.weight"``, ``"{block}.bias"``), an ``nn.ModuleList`` of
``nn.Linear`` (such as :class:`DtemHeads`) or :class:`DtemWeights`. Training patches timm models the
way :mod:`tomec.reference` does (its class swapping), with a forward that merges softly
(:func:`tomec.methods.dtem.soft_merge`): sizes enter attention as key weights
(:func:`tomec.train.vit.attention`), sequences keep their length.
"""

from __future__ import annotations

import copy
import logging
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .. import methods, schedule as schedules
from ..errors import ConfigError, UnsupportedModelError
from ..methods.dtem import (
    RANDOM_HEADS_WARNING, DtemWeights, HeadsLike, block_params, head_out_dim, init_head, load_heads, soft_merge,
)
from ..reference import patch_pool, swap_class, unpatch
from . import vit
from .common import frozen, task_loss

__all__ = [
    "DtemWeights", "DtemHeads", "head_out_dim", "init_head", "load_heads", "save_heads",
    "soft_merging", "train_heads", "RANDOM_HEADS_WARNING", "block_params",
]  # the weights' forms and loading live with the method (tomec.methods.dtem), re-exported here

log = logging.getLogger("tomec")

class DtemHeads(nn.ModuleList):
    """The trainable heads, one ``nn.Linear(C, d_m)`` per attention block."""

    @classmethod
    def create(cls, num_blocks: int, channels: int, head_dim: int, *, dim: Optional[int] = None,
               seed: int = 0) -> "DtemHeads":
        """Heads initialized exactly as the untrained method's random heads (same seed, same values)."""
        out_dim = dim or head_out_dim(channels, head_dim)
        heads = cls(nn.Linear(channels, out_dim) for _ in range(num_blocks))
        with torch.no_grad():
            for layer, lin in enumerate(heads):
                w, b = init_head(channels, out_dim, layer, seed)
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        return heads

    @classmethod
    def for_model(cls, model: nn.Module, *, dim: Optional[int] = None, seed: int = 0) -> "DtemHeads":
        """Untrained heads sized for a timm ViT's blocks."""
        blocks = vit.timm_blocks(model, "DTEM training")
        attn = blocks[0].attn
        return cls.create(len(blocks), attn.qkv.in_features, attn.head_dim, dim=dim, seed=seed)

    @classmethod
    def from_weights(cls, heads: HeadsLike) -> "DtemHeads":
        weights = load_heads(heads)
        out = cls(nn.Linear(w.shape[1], w.shape[0]) for w, _ in weights.layers)
        out.load_state_dict(weights.state_dict())
        return out

    def weights(self) -> DtemWeights:
        return load_heads(self)

    def save(self, path: Union[str, Path]) -> Path:
        """Save the state dict (fp32); ``heads=path`` loads it."""
        return save_heads(self, path)


def save_heads(heads: HeadsLike, path: Union[str, Path]) -> Path:
    """Save any accepted form of heads as a state dict file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in load_heads(heads).state_dict().items()}
    torch.save(state, path)
    return path


# --- training: soft merging in a timm model ---------------------------------------------------


@dataclass
class _SoftState:
    """What a soft-merging forward tracks across blocks (``size`` is read by the reference's
    size-weighted pooling)."""

    heads: nn.ModuleList
    num_layers: int
    protected: int
    r: Optional[int]
    inflect: float
    schedule_spec: Any
    k2: int
    tau1: float
    tau2: float
    generator: Optional[torch.Generator] = None  # draws the random A/B splits; None: parity
    schedule: Optional[list[int]] = None
    num_tokens: Optional[int] = None
    size: Optional[Tensor] = None
    n: int = 0

    def begin(self, x: Tensor) -> None:
        if self.schedule is None or self.num_tokens != x.shape[1]:
            self.schedule = schedules.resolve(  # as tomec.backend(method="dtem") resolves it
                self.num_layers, x.shape[1], self.protected, r=self.r, inflect=self.inflect,
                schedule=self.schedule_spec, cap=methods.get("dtem").cap,
            )
            self.num_tokens = x.shape[1]
        self.size = x.new_ones(x.shape[0], x.shape[1], 1)
        self.n = x.shape[1]


def _soft_block_forward(self: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None,
                        is_causal: bool = False) -> Tensor:
    if attn_mask is not None or is_causal:
        raise UnsupportedModelError("DTEM training does not merge under attention masks")
    st: _SoftState = self._tomec_state
    layer: int = self._tomec_layer
    if layer == 0:
        st.begin(x)
    h = self.norm1(x)
    # each key's softmax weight multiplied by its size (the official training form: differentiable
    # at size 0, where log(size) is not)
    x = vit.attention_residual(self, x, vit.attention(self.attn, h, key_weight=st.size[..., 0]).out)
    r = st.schedule[layer]
    if r > 0:
        metric = st.heads[layer](h.detach())  # the head learns; the backbone's tokens do not
        order = None
        if st.generator is not None:  # a new split per image and block, drawn on the CPU (seeded)
            order = torch.rand(x.shape[0], st.n - st.protected, generator=st.generator).argsort(-1)
            order = order.to(x.device)
        x, st.size, st.n = soft_merge(
            x, st.size, metric, r, st.n, st.protected, k2=st.k2, tau1=st.tau1, tau2=st.tau2,
            order=order,
        )
    return vit.mlp_residual(self, x)


@contextmanager
def soft_merging(
    model: nn.Module, heads: nn.ModuleList, *, r: Optional[int] = None, inflect: float = -0.5,
    schedule: Any = None, protect: Union[str, int] = "auto", k2: int = 3, tau1: float = 0.1,
    tau2: float = 0.1, split: str = "random", seed: int = 0,
) -> Iterator[nn.Module]:
    """Within the block, ``model`` (a timm ViT) runs DTEM's soft merging with ``heads``: the same
    schedule as ``tomec.backend(method="dtem", r=..., inflect=...)``, sequence lengths unchanged.
    ``split="random"`` draws each block's A/B split at random (seeded), as DTEM trains; ``"parity"``
    uses ToMe's alternation, as inference does. The reference's class swapping and size-weighted
    pooling are reused; undone on exit."""
    if r is None and schedule is None:
        raise ConfigError("give r= (tokens to remove in total) or schedule=")
    if split not in ("random", "parity"):
        raise ConfigError(f"dtem: split must be 'random' or 'parity', got {split!r}")
    blocks = vit.timm_blocks(model, "DTEM training")
    if len(heads) != len(blocks):
        raise ConfigError(f"dtem: {len(heads)} heads for {len(blocks)} attention blocks")
    if hasattr(model, "_tomec_state"):
        unpatch(model)
    protected = int(getattr(model, "num_prefix_tokens", 0)) if protect == "auto" else int(protect)
    generator = torch.Generator().manual_seed(seed) if split == "random" else None
    st = _SoftState(heads, len(blocks), protected, r, inflect, schedule, k2, tau1, tau2, generator)
    model._tomec_state = st
    try:
        for layer, b in enumerate(blocks):
            b._tomec_state, b._tomec_layer = st, layer
            swap_class(b, {"forward": _soft_block_forward}, "dtem_soft")
        patch_pool(model)
        yield model
    finally:
        unpatch(model)


def _batches(data: Any, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (images, labels) batches: random batches of a ``(x, y)`` tensor pair, or an iterable
    of batches, iterated pass after pass."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        while True:
            idx = torch.randperm(len(y), generator=generator)[:batch_size]
            yield x[idx], y[idx]
    else:
        while True:  # pass after pass, so a DataLoader reshuffles (itertools.cycle would replay one)
            empty = True
            for batch in data:
                empty = False
                yield batch
            if empty:
                raise ConfigError("train_heads: the data yielded no batch")


def train_heads(
    model: nn.Module,
    data: Union[tuple[Tensor, Tensor], Iterable[tuple[Tensor, Tensor]]],
    r: Optional[int] = None,
    steps: int = 200,
    lr: float = 1e-3,
    *,
    schedule: Any = None,
    heads: Optional[HeadsLike] = None,
    batch_size: int = 64,
    inflect: float = -0.5,
    k2: int = 3,
    tau1: float = 0.1,
    tau2: float = 0.1,
    weight_decay: float = 1e-4,
    clip_grad: Optional[float] = 5.0,
    split: str = "random",
    distill: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> DtemHeads:
    """Train DTEM heads by soft merging with cross-entropy on labels; the backbone stays frozen
    (no gradients, eval mode) and unchanged.

    Args:
        model: a timm ViT classifier.
        data: ``(images, labels)`` tensors (random batches of ``batch_size``, seeded), or an iterable
            of ``(images, labels)`` batches (iterated pass after pass).
        r: total tokens removed, spread as ``tomec.backend(r=r, inflect=inflect)`` spreads it.
        schedule: instead of ``r``, the per-block counts, as ``tomec.backend(schedule=...)`` takes
            them (train with the schedule the heads will run at).
        steps, lr, weight_decay, clip_grad: AdamW steps (the official defaults: lr 1e-4 over 30
            ImageNet epochs; a small data set needs a larger lr).
        heads: the starting heads (default: the untrained method's seeded random heads).
        k2, tau1, tau2: candidates per A token and the two temperatures (official: 3, 0.1, 0.1).
        split: the A/B split while training: ``"random"`` per block and image (DTEM's), or
            ``"parity"`` (ToMe's alternation, the one inference uses).
        distill: train towards the unmerged model's predictions (KL to its logits, a frozen copy)
            instead of the labels (:func:`tomec.train.common.task_loss`).

    Returns:
        The trained :class:`DtemHeads` (on CPU, fp32).
    """
    from tqdm import tqdm

    for name, value in (("steps", steps), ("batch_size", batch_size), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"train_heads: {name} must be a positive int, got {value!r}")
    if r is None and schedule is None:
        raise ConfigError("train_heads: give r= (tokens to remove in total) or schedule=")
    torch.manual_seed(seed)
    trained = DtemHeads.for_model(model, seed=seed) if heads is None else DtemHeads.from_weights(heads)
    device = next(model.parameters()).device
    trained = trained.to(device)
    opt = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "_tomec_state"):
        unpatch(model)  # as soft_merging would; the teacher must be the unmerged model
    # a copy, since soft merging patches the model's blocks in place
    teacher = copy.deepcopy(model).eval() if distill else None
    trained.train()
    with frozen(model), soft_merging(model, trained, r=r, inflect=inflect, schedule=schedule, k2=k2,
                                     tau1=tau1, tau2=tau2, split=split, seed=seed + 1):
        # the split draws from seed + 1, a stream apart from the batches'
        bar = tqdm(range(steps), desc="dtem heads", disable=not progress)
        for _, (x, y) in zip(bar, _batches(data, batch_size, g)):
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                target = teacher(x) if teacher is not None else None
            loss = task_loss(model(x), y, target)
            opt.zero_grad()
            loss.backward()
            if clip_grad is not None:
                nn.utils.clip_grad_norm_(trained.parameters(), clip_grad)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return trained.cpu().eval()
