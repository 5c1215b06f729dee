"""FPET's refinement adapter: its 1-bit form, save/load, and training with the official rule.

    adapter = tomec.train.fpet.train_adapter(model, (x_train, y_train), steps=200)
    adapter.save("adapter.pt")
    fast = torch.compile(model, backend=tomec.backend(method="fpet", r=98, adapter="adapter.pt"))

The official code (kyk120/fpet) installs a small adapter at the reduction block: ``d -> 32 -> d``,
ReLU between, no biases, both weights binarized (1 bit) with a straight-through estimator, applied to
the detached head-mean keys ``k̄``; the merge metric is ``k̄ + adapter(k̄)``. A binarized weight is
``μ + σ · c · sign(W − μ)`` with ``μ``, ``σ`` the mean and (unbiased) standard deviation of the whole
tensor and ``c = Φ⁻¹(3/4) ≈ 0.6745`` (the 1-bit Lloyd-Max level of a unit Gaussian, as its code
computes it, in fp32). At inference tomec uses those effective weights (``adapter=`` accepts a path
to a saved state dict, a state dict with ``down`` / ``up`` (or the official
``adapter_down.weight`` / ``adapter_up.weight``), or an :class:`FpetAdapter`).

Training (:func:`train_adapter`): backbone frozen, cross entropy, AdamW (lr 1e-3, weight decay 1e-4,
the official optimizer), the official straight-through assignment ``M = soft + (hard − soft).detach()``
with ``soft = sigmoid(S − mean of each row's top two)`` and ``hard = S > that mean``, over every
(A, B) pair, the merge written with ``M`` densely. Every A token leaves the reduction block, as in
the official code (``r = |A|``). The blocks run the forward the reference runs
(:mod:`tomec.train.vit`: a gated attention is gated).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..methods.fpet import (
    BINARY_LEVEL, NO_ADAPTER_WARNING, FpetWeights, binarize, fpet_grid, fpet_metric, fpet_sides, load_adapter,
)
from . import vit
from .common import frozen, task_loss

__all__ = [
    "FpetAdapter", "FpetWeights", "binarize", "load_adapter", "train_adapter", "soft_forward", "NO_ADAPTER_WARNING",
    "BINARY_LEVEL",
]  # the 1-bit weights and their loading live with the method (tomec.methods.fpet), re-exported here

log = logging.getLogger("tomec")

AdapterLike = Union[str, Path, Mapping[str, Tensor], "FpetAdapter"]

HIDDEN = 32

class FpetAdapter(nn.Module):
    """The refinement adapter, trainable: ``down [hidden, d]``, ``up [d, hidden]`` (1-bit weights)."""

    def __init__(self, dim: int, hidden: int = HIDDEN, *, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / dim**0.5  # nn.Linear's default (kaiming uniform with a = sqrt(5))
        self.down = nn.Parameter((torch.rand(hidden, dim, generator=g) * 2 - 1) * bound)
        # the official init: a truncated normal of std 1e-3 inside ±2e-3 (not zero: a zero tensor
        # has no sign to binarize)
        up = torch.randn(dim, hidden, generator=g) * 1e-3
        while bool((up.abs() > 2e-3).any()):
            redraw = torch.randn(dim, hidden, generator=g) * 1e-3
            up = torch.where(up.abs() > 2e-3, redraw, up)
        self.up = nn.Parameter(up)
        self.dropout = nn.Dropout(0.1)

    def effective(self) -> dict[str, Tensor]:
        """The binarized weights ``{"down": [h, d], "up": [d, h]}`` (differentiable)."""
        return {"down": binarize(self.down), "up": binarize(self.up)}

    def forward(self, k: Tensor) -> Tensor:
        """``[B, N, d] -> [B, N, d]``: the metric ``k + up(dropout(relu(down(k))))``."""
        w = self.effective()
        return k + F.linear(self.dropout(F.relu(F.linear(k, w["down"]))), w["up"])

    def save(self, path: Union[str, Path]) -> Path:
        """Save ``{"down", "up"}`` (fp32, the raw weights); ``adapter=path`` loads them."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, path)
        return path


# --- training: the official dense straight-through merge in a timm model -----------------------


def _ste_merge(x: Tensor, size: Tensor, metric: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    """Every A token into the B tokens through ``M = soft + (hard − soft).detach()``; returns the
    protected tokens then the B tokens (official order), and their sizes."""
    n = x.shape[1]
    side_a, side_b = (torch.tensor(s).to(x.device) + protected for s in fpet_sides(fpet_grid(n, protected)))
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[:, side_a] @ unit[:, side_b].transpose(1, 2)  # [B, n_a, n_b]
    mid = scores.topk(2, dim=-1).values.mean(-1, keepdim=True)
    soft = torch.sigmoid(scores - mid)
    assign = soft + ((scores > mid).to(soft.dtype) - soft).detach()  # [B, n_a, n_b]
    xs, sizes = x * size, size
    onto = assign.transpose(1, 2).to(x.dtype)  # [B, n_b, n_a]
    total = sizes[:, side_b] + onto @ sizes[:, side_a]
    merged = (xs[:, side_b] + onto @ xs[:, side_a]) / total
    return torch.cat([x[:, :protected], merged], 1), torch.cat([size[:, :protected], total], 1)


def soft_forward(model: nn.Module, images: Tensor, adapter: FpetAdapter, block: Optional[int] = None,
                 protected: int = 1, prop_attn: bool = True) -> Tensor:
    """The timm ViT with FPET at ``block`` (None: the middle one) as the official training forward
    computes it; returns the logits. Its forward values are tomec's hard merge (up to rounding)."""
    blocks = vit.vit_blocks(model, "FPET training")
    block = len(blocks) // 2 if block is None else block
    x, size = vit.embed(model, images), None
    for layer, blk in enumerate(blocks):
        out, _, k, _ = vit.attention(blk.attn, blk.norm1(x), size if prop_attn else None, explicit=True)
        x = vit.attention_residual(blk, x, out)
        if layer == block:
            if size is None:
                size = x.new_ones(*x.shape[:2], 1)
            x, size = _ste_merge(x, size, adapter(fpet_metric(k)), protected)
        x = vit.mlp_residual(blk, x)
    return vit.head(model, x, x.new_ones(*x.shape[:2], 1) if size is None else size, protected=protected)


def _batches(x: Tensor, y: Tensor, batch_size: int, g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]


def train_adapter(
    model: nn.Module, data: tuple[Tensor, Tensor], *, block: Optional[int] = None, steps: int = 200,
    lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0,
    distill: bool = False, progress: bool = True,
) -> FpetAdapter:
    """Train FPET's refinement adapter on ``data = (images [M, 3, H, W], labels [M])`` with the
    backbone frozen (the official recipe also tunes PEFT modules and the head jointly; here the
    model is taken as given). Returns the adapter (``.save(path)``; ``adapter=`` loads it)."""
    from tqdm import tqdm

    x, y = data
    if steps < 1 or batch_size < 1 or batch_size > len(x):
        raise ConfigError(f"fpet: steps={steps} and batch_size={batch_size} (of {len(x)} images) must be >= 1")
    attn = model.blocks[0].attn
    adapter = FpetAdapter(attn.head_dim, seed=seed).to(x.device)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the adapter's dropout
    with frozen(model):
        adapter.train()
        batches = _batches(x, y, batch_size, g)
        for _ in tqdm(range(steps), desc="fpet adapter", disable=not progress):
            xb, yb = next(batches)
            teacher = None
            if distill:
                with torch.no_grad():
                    teacher = model(xb)
            loss = task_loss(soft_forward(model, xb, adapter, block), yb, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    adapter.eval()
    return adapter
