"""DTEM's learned heads: their forms, save/load, and training by soft merging (backbone frozen).

    heads = tomec.dtem.train_heads(model, (x_train, y_train), r=48, steps=300)
    heads.save("heads.pt")
    fast = torch.compile(model, backend=tomec.backend(method="dtem", r=48, heads="heads.pt"))

A head is ``nn.Linear(C, d_m)`` per attention block (``d_m`` = the head width ``d``, or ``2d`` for
``C >= 1024``; no norm or activation), reading the tokens that enter the block's attention
projections, as in the official code (movinghoon/DTEM). ``heads=`` accepts a path to a saved state
dict, a state dict (``"{block}.weight"``, ``"{block}.bias"``), an ``nn.ModuleList`` of
``nn.Linear`` (such as :class:`DtemHeads`) or :class:`DtemWeights`. Training patches timm models the
way :mod:`tomec.reference` does (its class swapping), with a forward that merges softly
(:func:`tomec.ops.dtem.soft_merge`): sizes enter attention as weights, sequences keep their length.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import schedule as schedules
from .errors import ConfigError, UnsupportedModelError
from .finetune import frozen, load_state_file, task_loss
from .ops.dtem import soft_merge

__all__ = [
    "DtemWeights", "DtemHeads", "head_out_dim", "init_head", "load_heads", "save_heads",
    "soft_merging", "train_heads", "RANDOM_HEADS_WARNING",
]

log = logging.getLogger("tomec")

HeadsLike = Union[str, Path, Mapping[str, Tensor], nn.ModuleList, "DtemWeights"]

RANDOM_HEADS_WARNING = (
    "dtem: no trained heads given (heads=None): DTEM is ToMe with a random metric (seeded random "
    "heads, seed={seed}); train heads with tomec.dtem.train_heads and pass heads="
)


def head_out_dim(channels: int, head_dim: int) -> int:
    """The official head width: the attention head width ``d``, or ``2d`` for ``C >= 1024``."""
    return head_dim if channels < 1024 else 2 * head_dim


@functools.lru_cache(maxsize=256)
def init_head(channels: int, out_dim: int, layer: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A block's untrained head, reproducible: ``nn.Linear``'s default distribution
    (uniform in ±1/sqrt(C)) drawn from a generator seeded by ``(seed, layer)``. Cached: do not
    modify the tensors in place."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    bound = 1.0 / math.sqrt(channels)
    weight = (torch.rand(out_dim, channels, generator=g) * 2 - 1) * bound
    bias = (torch.rand(out_dim, generator=g) * 2 - 1) * bound
    return weight, bias


class DtemWeights:
    """Trained heads in normalized form: one ``(weight [d_m, C], bias [d_m])`` per block (detached
    copies, fp32 or fp64)."""

    def __init__(self, layers: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.layers = tuple((w.detach().clone(), b.detach().clone()) for w, b in layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        w = self.layers[0][0] if self.layers else None
        shape = f"{w.shape[1]} -> {w.shape[0]}" if w is not None else "empty"
        return f"DtemWeights({len(self.layers)} blocks, {shape})"

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for i, (w, b) in enumerate(self.layers):
            out[f"{i}.weight"], out[f"{i}.bias"] = w, b
        return out


def _from_state_dict(state: Mapping[str, Any], where: str) -> DtemWeights:
    blocks: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        index, _, name = str(key).partition(".")
        if not index.isdigit() or name not in ("weight", "bias") or not isinstance(value, Tensor):
            raise ConfigError(
                f"dtem: heads {where} must map '<block>.weight' / '<block>.bias' to tensors "
                f"(an nn.ModuleList state dict), found key {key!r}"
            )
        blocks.setdefault(int(index), {})[name] = value
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ConfigError(f"dtem: heads {where} must cover blocks 0..L-1, found {sorted(blocks)}")
    layers = []
    for i in range(len(blocks)):
        w = blocks[i].get("weight")
        if w is None or w.dim() != 2:
            raise ConfigError(f"dtem: heads {where}: block {i} has no 2-D weight [d_m, C]")
        b = blocks[i].get("bias")
        b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
        if b.shape != (w.shape[0],):
            raise ConfigError(f"dtem: heads {where}: block {i} bias {list(b.shape)} for weight {list(w.shape)}")
        layers.append((w.float() if w.dtype in (torch.float16, torch.bfloat16) else w,
                       b.float() if b.dtype in (torch.float16, torch.bfloat16) else b))
    return DtemWeights(layers)


def load_heads(heads: Optional[HeadsLike]) -> Optional[DtemWeights]:
    """Any accepted form of ``heads=`` as :class:`DtemWeights` (None stays None)."""
    if heads is None or isinstance(heads, DtemWeights):
        return heads
    if isinstance(heads, (str, Path)):
        return _from_state_dict(load_state_file(heads, "dtem: heads"), f"in {heads}")
    if isinstance(heads, nn.ModuleList):
        if not all(isinstance(m, nn.Linear) for m in heads):
            raise ConfigError("dtem: heads as an nn.ModuleList must hold one nn.Linear per block")
        return _from_state_dict(heads.state_dict(), "(nn.ModuleList)")
    if isinstance(heads, Mapping):
        return _from_state_dict(heads, "(state dict)")
    raise ConfigError(
        f"dtem: heads must be a path, a state dict, an nn.ModuleList of nn.Linear or DtemWeights, "
        f"got {type(heads).__name__}"
    )


def block_params(
    heads: Optional[DtemWeights], *, seed: int, dim: Optional[int], layer: int, num_layers: int,
    channels: int, head_dim: int,
) -> dict[str, Tensor]:
    """One block's head ``{"weight": [d_m, C], "bias": [d_m]}``: the trained one, or the seeded
    random init when ``heads`` is None."""
    if heads is None:
        weight, bias = init_head(channels, dim or head_out_dim(channels, head_dim), layer, seed)
        return {"weight": weight, "bias": bias}
    if len(heads) != num_layers:
        raise ConfigError(f"dtem: heads has {len(heads)} blocks, the model {num_layers} attention blocks")
    weight, bias = heads.layers[layer]
    if weight.shape[1] != channels:
        raise ConfigError(
            f"dtem: the head of block {layer} takes {weight.shape[1]} channels, the model's tokens "
            f"have {channels}"
        )
    return {"weight": weight, "bias": bias}


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
        blocks = _timm_blocks(model)
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


def _timm_blocks(model: nn.Module) -> list[nn.Module]:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks or not all(isinstance(b.attn, Attention) for b in blocks):
        raise UnsupportedModelError(
            f"{type(model).__name__}: DTEM training supports timm VisionTransformer-style models "
            f"(timm Blocks with timm Attention)"
        )
    return blocks


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
            from .methods import get

            self.schedule = schedules.resolve(  # as tomec.backend(method="dtem") resolves it
                self.num_layers, x.shape[1], self.protected, r=self.r, inflect=self.inflect,
                schedule=self.schedule_spec, cap=get("dtem").cap,
            )
            self.num_tokens = x.shape[1]
        self.size = x.new_ones(x.shape[0], x.shape[1], 1)
        self.n = x.shape[1]


def _size_weighted_attention(self: nn.Module, x: Tensor, size: Tensor) -> Tensor:
    """timm ``Attention`` with each key's softmax weight multiplied by its size (the official
    training form: differentiable at size 0, where ``log(size)`` is not)."""
    batch, n, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    logits = (q * self.scale) @ k.transpose(-2, -1)
    e = (logits - logits.amax(-1, keepdim=True)).exp() * size[:, None, None, :, 0].to(logits.dtype)
    attn = self.attn_drop(e / e.sum(-1, keepdim=True))
    x = (attn @ v).transpose(1, 2).reshape(batch, n, self.num_heads * self.head_dim)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _soft_block_forward(self: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None,
                        is_causal: bool = False) -> Tensor:
    if attn_mask is not None or is_causal:
        raise UnsupportedModelError("DTEM training does not merge under attention masks")
    st: _SoftState = self._tomec_state
    layer: int = self._tomec_layer
    if layer == 0:
        st.begin(x)
    h = self.norm1(x)
    x = x + self.drop_path1(self.ls1(_size_weighted_attention(self.attn, h, st.size)))
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
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


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
    from timm.models.vision_transformer import VisionTransformer

    from .reference import _pool, _swap_class, unpatch

    if r is None and schedule is None:
        raise ConfigError("give r= (tokens to remove in total) or schedule=")
    if split not in ("random", "parity"):
        raise ConfigError(f"dtem: split must be 'random' or 'parity', got {split!r}")
    blocks = _timm_blocks(model)
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
            _swap_class(b, {"forward": _soft_block_forward}, "dtem_soft")
        if isinstance(model, VisionTransformer):
            _swap_class(model, {"pool": _pool, "_tomec_plain_pool": VisionTransformer.pool}, "vit")
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
            instead of the labels (:func:`tomec.finetune.task_loss`).

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
        from .reference import unpatch

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
