"""LTMP's thresholds: learn them, run them on sample data, and turn them into a static schedule.

LTMP's thresholds pick a different number of tokens per image; a compiled graph has fixed shapes.
:func:`calibrate` runs the thresholded model eagerly, one image at a time (``ops.ltmp_match`` with
the counts the thresholds pick, :func:`tomec.methods.ltmp.ltmp_threshold_counts`), and takes per block
the *rounded mean over images* of the merged and of the pruned counts (then lowered, block by block,
to what the static token counts allow). ``tomec.backend(method="ltmp", counts=...)`` compiles that.

:func:`train_thresholds` learns the 2 thresholds per block with the backbone frozen, as the official
code (Mxbonn/ltmp ``tools/train.py``): straight-through threshold masks (hard in the forward pass,
``sigmoid((score - θ) / τ)`` gradients), masked tokens left in place but removed from every later
attention's keys, loss ``CE + λ (FLOPs ratio - target)²``, thresholds clamped to ``[0, 1]``.

Only timm ``VisionTransformer``-style models (``patch_embed``, ``blocks`` of timm ``Block`` with
timm ``Attention``) are supported here; their forward is :mod:`tomec.train.vit` (a gated attention
is gated, as in the reference and the compiled model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..errors import ConfigError
from ..flops import block_macs, vit_dims
from ..methods.ltmp import load_ltmp_thresholds, ltmp_match, ltmp_prune_cap, ltmp_threshold_counts
from . import vit
from .common import frozen

__all__ = ["calibrate", "threshold_forward", "train_thresholds", "static_counts", "flops_ratio"]

STATISTIC = "per block, the mean over images of the merged and the pruned counts, rounded half up"


def _check_vit(model: nn.Module) -> int:
    vit.vit_blocks(model, "LTMP calibration and training")
    return int(getattr(model, "num_prefix_tokens", 0))


@torch.no_grad()
def threshold_forward(
    model: nn.Module, images: Tensor, thresholds: Any, *, prop_attn: bool = True
) -> tuple[Tensor, Tensor]:
    """The thresholded LTMP model, eager, one image at a time (counts vary per image).

    Returns the logits ``[B, classes]`` and the counts ``[B, L, 2]`` (merged, pruned) per block.
    """
    protected = _check_vit(model)
    th = load_ltmp_thresholds(thresholds)
    if len(th["merge"]) != len(model.blocks):
        raise ConfigError(
            f"ltmp: {len(th['merge'])} thresholds per kind for a model with {len(model.blocks)} blocks"
        )
    logits, counts = [], []
    for image in images:
        x = vit.embed(model, image[None])
        size, per_block = None, []
        for layer, block in enumerate(model.blocks):
            attn_out, q, k, _ = vit.attention(block.attn, block.norm1(x), size if prop_attn else None,
                                              explicit=True)
            x = vit.attention_residual(block, x, attn_out)
            m, p = ltmp_threshold_counts(
                k, q, size, protected, th["merge"][layer], th["prune"][layer],
                scale=block.attn.scale, prop_attn=prop_attn,
            )
            m, p = int(m[0]), int(p[0])
            # every block, also one that removes nothing: it reorders the tokens A then B
            dest = ltmp_match(k, q, size, m, p, protected, scale=block.attn.scale, prop_attn=prop_attn)
            x, size = ops.merge(x, size, dest, x.shape[1] - m - p, n_dropped=p)
            per_block.append((m, p))
            x = vit.mlp_residual(block, x)
        weight = x.new_ones(*x.shape[:2], 1) if size is None else size
        logits.append(vit.head(model, x, weight, protected=protected)[0])
        counts.append(per_block)
    return torch.stack(logits), torch.tensor(counts, dtype=torch.int64).reshape(len(images), -1, 2)


def static_counts(counts: Tensor, num_tokens: int, protected: int) -> dict[str, list[int]]:
    """Per-image counts ``[B, L, 2]`` -> one static schedule: the rounded mean per block (half up),
    lowered where needed so that every block fits the static token counts."""
    mean = counts.double().mean(0)
    rounded = torch.floor(mean + 0.5).to(torch.int64).tolist()
    merge, prune, n = [], [], num_tokens
    for m, p in rounded:
        m = min(m, (n - protected) // 2)
        p = min(p, ltmp_prune_cap(n, protected, m))
        merge.append(m)
        prune.append(p)
        n -= m + p
    return {"merge": merge, "prune": prune}


def calibrate(
    model: nn.Module,
    thresholds: Any,
    images: Tensor,
    *,
    batch_size: int = 64,
    prop_attn: bool = True,
    out: Optional[Union[str, Path]] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run LTMP's thresholds on ``images [B, C, H, W]``; return (and write to ``out``) the static
    schedule ``{"merge": [...], "prune": [...]}`` for ``tomec.backend(method="ltmp", counts=...)``,
    with provenance (thresholds, images, the statistic, the mean counts)."""
    from tqdm import tqdm

    protected = _check_vit(model)
    if len(images) == 0:
        raise ConfigError("calibrate needs at least one image")
    chunks = list(torch.split(images, batch_size))
    with frozen(model):
        found = [threshold_forward(model, c, thresholds, prop_attn=prop_attn)[1]
                 for c in tqdm(chunks, desc="calibrate", disable=not progress)]
    counts = torch.cat(found)
    num_tokens = vit_dims(model).num_tokens
    result = static_counts(counts, num_tokens, protected)
    mean = counts.double().mean(0)
    result.update({
        "thresholds": load_ltmp_thresholds(thresholds),
        "images": len(images),
        "statistic": STATISTIC,
        "mean_merge": [round(v, 4) for v in mean[:, 0].tolist()],
        "mean_prune": [round(v, 4) for v in mean[:, 1].tolist()],
        "tokens": num_tokens,
        "protected": protected,
    })
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


# --- learning the thresholds ------------------------------------------------------------------


def _straight_through(score: Tensor, threshold: Tensor, tau: float) -> Tensor:
    soft = torch.sigmoid((score - threshold) / tau)
    return soft + ((soft > 0.5).to(soft.dtype) - soft).detach()


def flops_ratio(kept: list[Tensor], num_tokens: int, dim: int, mlp_ratio: float) -> Tensor:
    """Blocks' MACs relative to the unmerged model; ``kept[l]`` is the fraction of tokens alive
    after block ``l`` (differentiable)."""
    n = torch.tensor(float(num_tokens))
    total, full = 0.0, 0.0
    frac = torch.ones(())
    for f in kept:
        total = total + block_macs(frac * n, f * n, dim, mlp_ratio)
        full = full + block_macs(n, n, dim, mlp_ratio)
        frac = f
    return total / full


def _soft_forward(model, images, theta, protected, tau, prop_attn=True):
    """The official training-time LTMP: masks instead of removal. Returns logits and the kept
    fraction after each block (straight-through values)."""
    x = vit.embed(model, images)
    batch, n, _ = x.shape
    size = x.new_ones(batch, n, 1)
    keep = x.new_ones(batch, n)
    prot = (torch.arange(n, device=x.device) < protected).expand(batch, n)  # follows the tokens' reordering
    n_b = n // 2
    kept = []
    for layer, block in enumerate(model.blocks):
        alive = keep.detach() > 0.5
        # masked keys: a multiplier after the exponential, as the official softmax_with_mask
        attn_out, _, k, probs = vit.attention(block.attn, block.norm1(x), size if prop_attn else None,
                                              key_weight=keep)
        x = vit.attention_residual(block, x, attn_out)
        live_q = alive.to(x.dtype)[:, None, :, None]
        importance = (probs * live_q).sum((1, 2)) / (live_q.sum((1, 2)) * probs.shape[1])
        metric = F.normalize(k.mean(1), dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, n_a, n_b]
        ok_a = alive[:, ::2] & ~prot[:, ::2]
        ok_b = alive[:, 1::2] & ~prot[:, 1::2]
        scores = scores.masked_fill(~(ok_a[:, :, None] & ok_b[:, None, :]), -math.inf)
        best, partner = scores.max(-1)
        merge = _straight_through(best.detach(), theta[layer, 0], tau) * ok_a
        hard = merge.detach() > 0.5
        onto = (partner[..., None] == torch.arange(n_b, device=x.device)) & hard[..., None]  # [B, n_a, n_b]
        xs = x * size
        add = onto.transpose(1, 2).to(x.dtype)  # merged sources' values and sizes onto partners
        # The official order after a block: all A tokens, then all B tokens (sources stay, masked)
        size = torch.cat([size[:, ::2], size[:, 1::2] + add @ size[:, ::2]], 1)
        x = torch.cat([xs[:, ::2], xs[:, 1::2] + add @ xs[:, ::2]], 1) / size
        keep = torch.cat([keep[:, ::2] * (1 - merge), keep[:, 1::2]], 1)
        touched = torch.cat([hard, onto.any(1)], 1)
        prot = torch.cat([prot[:, ::2], prot[:, 1::2]], 1)
        candidate = (keep.detach() > 0.5) & ~touched & ~prot
        prune_keep = _straight_through(importance.detach(), theta[layer, 1], tau)
        keep = torch.where(candidate, keep * prune_keep, keep)
        kept.append(keep.mean())
        x = vit.mlp_residual(block, x)
    # prefix tokens are out of an average pool (they may sit anywhere after the reordering)
    return vit.head(model, x, (size[..., 0] * keep * ~prot)[..., None], protected=0), kept


def train_thresholds(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    target: float = 0.75,
    epochs: int = 3,
    batch_size: int = 64,
    lr: tuple[float, float] = (5e-3, 5e-4),
    tau: float = 0.5,
    reg_scale: float = 10.0,
    init: tuple[float, float] = (0.9, 0.0),
    seed: int = 0,
    prop_attn: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Learn LTMP's merge and prune thresholds (2 per block) with the model frozen.

    Defaults follow the official code: init 0.9 (merge) and 0 (prune), ``τ = 0.5``, ``λ = 10``,
    FLOPs target 0.75. Deviations: Adam (``lr`` for merge, prune) rather than the official plain
    SGD, to move within a few epochs of a small data set; the scores (best cosine, importance) are
    detached, so a threshold's gradient comes through its own masks only (through the scores of
    later blocks it had mixed signs, and the FLOPs term pulled some thresholds the wrong way).
    The FLOPs ratio is METHODS.md's FLOP model with the model's MLP ratio. Returns
    ``{"merge": [...], "prune": [...], "history": [...]}``.
    """
    protected = _check_vit(model)
    with frozen(model):
        return _train_thresholds(model, images, labels, protected, init, epochs, batch_size, lr,
                                 tau, reg_scale, target, seed, prop_attn, progress)


def _train_thresholds(model, images, labels, protected, init, epochs, batch_size, lr, tau, reg_scale,
                      target, seed, prop_attn, progress):
    from tqdm import tqdm

    n_layers = len(model.blocks)
    theta = torch.tensor([list(init)] * n_layers, dtype=torch.float32)
    theta_merge = theta[:, :1].clone().requires_grad_(True)
    theta_prune = theta[:, 1:].clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [theta_merge], "lr": lr[0]}, {"params": [theta_prune], "lr": lr[1]}])
    num_tokens = vit.embed(model, images[:1]).shape[1]
    dim = model.blocks[0].attn.qkv.in_features
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / dim
    g = torch.Generator().manual_seed(seed)
    history = []
    steps = epochs * math.ceil(len(images) / batch_size)
    bar = tqdm(total=steps, desc="ltmp thresholds", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for idx in torch.split(order, batch_size):
            logits, kept = _soft_forward(model, images[idx], torch.cat([theta_merge, theta_prune], 1),
                                         protected, tau, prop_attn)
            ce = F.cross_entropy(logits, labels[idx])
            ratio = flops_ratio(kept, num_tokens, dim, mlp_ratio)
            loss = ce + reg_scale * (ratio - target) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                theta_merge.clamp_(0, 1)
                theta_prune.clamp_(0, 1)
            history.append({"ce": ce.item(), "flops_ratio": ratio.item()})
            bar.update()
            bar.set_postfix(ce=f"{ce.item():.3f}", flops=f"{ratio.item():.3f}")
    bar.close()
    return {"merge": theta_merge.detach()[:, 0].tolist(), "prune": theta_prune.detach()[:, 0].tolist(),
            "history": history}
