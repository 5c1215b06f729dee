"""DiffRate's schedule search: learn how many tokens each block prunes and merges, backbone frozen.

Each block (but the first) gets two learnable distributions over the number of patch tokens it keeps,
one after pruning and one after merging (DiffRate's "differentiable discrete proxy"). The search runs
a masked forward pass that keeps the sequence length: tokens are sorted by the CLS token's attention,
the ones beyond the sampled kept count are masked out of later attention (pruned) or merged into their
most similar kept token and then masked (merged); a straight-through estimator carries the gradient
from the masks to the distributions. The loss is the task loss plus a quadratic penalty and a
Lagrange multiplier (method of multipliers) on the distance of the expected MACs (the METHODS.md FLOP
model, differentiable in the kept counts) from a target; the step size decays (cosine). The learned
counts are finally multiplied by the one factor that spends the budget. The result is a ``kept``
schedule for ``tomec.backend(method="diffrate", kept=...)``.

Written from the DiffRate paper and the public code (OpenGVLab/DiffRate), which this follows in:
the candidate counts (every count from all patches down to one), zero-initialised logits, the
expected count rounded up with a straight-through ceil, the mask of positions beyond the count with
a straight-through keep probability, the masked softmax that lets a masked token still attend to
itself, merging by plain means with sizes scaled by the similarity (at least 1), the straight-through
min that sends the MACs gradient to both of a block's counts, and no compression in block 0. The
blocks run the forward the reference runs (:mod:`tomec.train.vit`: a gated attention is gated). The
multiplier, the decay and the final factor are tomec's: with the official fixed penalty the search
ended 20% above the budget on the digits ViT, and cutting the excess from the last blocks undid the
allocation it had learned.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..flops import block_macs, flops_report, vit_dims
from . import vit
from .common import frozen, task_loss

__all__ = ["KeptCount", "search_diffrate", "masked_forward"]


def _ste_ceil(value: Tensor) -> Tensor:
    return value + (value.ceil() - value).detach()


def _ste_min(n_in: Tensor, prune_kept: Tensor, merge_kept: Tensor) -> Tensor:
    """The tokens a block passes on, ``min(n_in, prune_kept, merge_kept)``, with the gradient going
    to both of the block's counts whichever is smallest, and none to ``n_in`` (as DiffRate's
    ``ste_min``): a block whose counts sit above the tokens it receives still feels the MACs
    penalty, instead of freezing there while an earlier block takes all of the reduction. In
    exchange a block gets no credit for the MACs its reduction saves in later blocks."""
    value = torch.minimum(n_in, torch.minimum(prune_kept, merge_kept)).detach()
    return value + (prune_kept - prune_kept.detach()) + (merge_kept - merge_kept.detach())


class KeptCount(nn.Module):
    """A learnable distribution over how many of ``patches`` tokens a block keeps (at least 1)."""

    def __init__(self, patches: int) -> None:
        super().__init__()
        self.register_buffer("candidates", torch.arange(patches, 0, -1, dtype=torch.float32))
        self.logits = nn.Parameter(torch.zeros(patches))

    def expected(self) -> Tensor:
        """The expected kept count, rounded up (straight-through): a 0-d tensor."""
        return _ste_ceil(self.candidates @ self.logits.softmax(-1))

    def keep_probability(self) -> Tensor:
        """``[patches]``: the probability that sorted position ``j`` is kept (count > j)."""
        # candidates run patches..1, so "count > j" holds for the first patches - j of them
        return self.logits.softmax(-1).cumsum(0).flip(0)

    def mask(self, kept: int, upto: int) -> Tensor:
        """``[patches]``: 0 at positions ``[kept, upto)`` (the ones this step removes), 1 elsewhere,
        with the keep probability's gradient (straight-through)."""
        prob = self.keep_probability()
        hard = torch.ones_like(prob)
        hard[kept:upto] = 0.0
        return hard - prob.detach() + prob


def _policy(mask: Tensor) -> Tensor:
    """``[B, N] -> [B, N, N]``: the key weights of the search's masked softmax: a masked key
    (``mask`` 0) is left out, except a token's own key."""
    policy = mask[:, None, :]
    eye = torch.eye(mask.shape[-1], dtype=mask.dtype, device=mask.device)
    return policy + (1.0 - policy) * eye


def _gather_tokens(t: Tensor, idx: Tensor) -> Tensor:
    if t.dim() == 2:
        return t.gather(1, idx)
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def masked_forward(
    model: nn.Module, images: Tensor, prune: nn.ModuleList, merge: nn.ModuleList,
    compress_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """The search's forward pass on a timm ``VisionTransformer`` with one CLS token; block 0
    compresses only with ``compress_first``.

    Returns ``logits [B, classes]`` and the expected MACs per image (a 0-d tensor with gradients to
    the kept-count distributions).
    """
    dims = vit_dims(model)
    x = vit.embed(model, images)
    batch, n, _ = x.shape
    size = x.new_ones(batch, n, 1)
    mask = x.new_ones(batch, n)
    alive = n - 1  # live patch tokens: the first `alive` after the CLS token, once sorted
    n_in = torch.tensor(float(n), device=x.device)
    macs = torch.tensor(float(dims.patch_macs), device=x.device)
    for layer, block in enumerate(model.blocks):
        out, _, _, weights = vit.attention(block.attn, block.norm1(x), size, key_weight=_policy(mask), eps=1e-6)
        x = vit.attention_residual(block, x, out)

        # sort the patches by the CLS token's attention, most important first
        order = weights[:, :, 0, 1:].mean(1).argsort(dim=-1, descending=True, stable=True)
        idx = torch.cat([order.new_zeros(batch, 1), order + 1], dim=1)
        x, size, mask = _gather_tokens(x, idx), _gather_tokens(size, idx), _gather_tokens(mask, idx)

        n_out = n_in
        if layer > 0 or compress_first:
            prune_kept = prune[layer].expected()
            kept = int(prune_kept.item())
            if kept < alive:
                mask = mask * torch.cat([mask.new_ones(1), prune[layer].mask(kept, alive)])
            mid = min(alive, kept)
            merge_kept = merge[layer].expected()
            kept = int(merge_kept.item())
            if kept < mid:
                x, size = _merge_tail(x, size, kept, mid)
                mask = mask * torch.cat([mask.new_ones(1), merge[layer].mask(kept, mid)])
            alive = min(mid, kept)
            n_out = _ste_min(n_in, 1.0 + prune_kept, 1.0 + merge_kept)
        macs = macs + block_macs(n_in, n_out, dims.dim, dims.mlp_ratio)
        n_in = n_out
        x = vit.mlp_residual(block, x)
    # an average pool counts the live tokens by size (a CLS token's pool reads the CLS token alone)
    return vit.head(model, x, size * mask[..., None]), macs


def _merge_tail(x: Tensor, size: Tensor, kept: int, mid: int) -> tuple[Tensor, Tensor]:
    """Merge sorted patches ``[kept, mid)`` into their most similar among ``[0, kept)`` (cosine on
    ``x``, plain means, sizes scaled by the similarity and at least 1); the merged ones stay in place
    (the caller masks them)."""
    patches, sizes = x[:, 1:], size[:, 1:]
    src, dst = patches[:, kept:mid], patches[:, :kept]
    unit = F.normalize(patches.detach(), dim=-1)
    best, partner = (unit[:, kept:mid] @ unit[:, :kept].transpose(1, 2)).max(-1)
    onto = (partner.unsqueeze(1) == torch.arange(kept, device=x.device).view(1, kept, 1)).to(x.dtype)
    count = 1.0 + onto.sum(-1, keepdim=True)  # [B, kept, 1]
    merged = (dst + onto @ src) / count
    src_size = (sizes[:, kept:mid] * best.unsqueeze(-1)).clamp_min(1.0)
    merged_size = sizes[:, :kept] + onto @ src_size
    x = torch.cat([x[:, :1], merged, patches[:, kept:]], dim=1)
    size = torch.cat([size[:, :1], merged_size, sizes[:, kept:]], dim=1)
    return x, size


def _kept_schedule(
    prune: nn.ModuleList, merge: nn.ModuleList, num_tokens: int, compress_first: bool,
    scale: float = 1.0,
) -> dict[str, list[int]]:
    """The learned counts (CLS included), each count of patches multiplied by ``scale`` (at least 1)."""
    prune_kept, merge_kept = ([], []) if compress_first else ([num_tokens], [num_tokens])
    for p, m in list(zip(prune, merge))[0 if compress_first else 1 :]:
        for kept, count in ((prune_kept, p), (merge_kept, m)):
            kept.append(min(max(1, math.floor(scale * count.expected().item())), num_tokens - 1) + 1)
    return {"prune_kept": prune_kept, "merge_kept": merge_kept}


def _one_patch_schedule(num_tokens: int, num_blocks: int, compress_first: bool) -> dict[str, list[int]]:
    """The cheapest schedule the search can return: the CLS token and one patch after every block
    (after every block but the first without ``compress_first``)."""
    kept = [2] * num_blocks
    if not compress_first:
        kept[0] = num_tokens
    return {"prune_kept": list(kept), "merge_kept": kept}


def schedule_macs(model: nn.Module, kept: dict[str, list[int]]) -> int:
    """MACs per image of ``model`` under a DiffRate ``kept`` schedule (METHODS.md FLOP model)."""
    return flops_report(model, "diffrate", kept=kept, measure=False)["macs"]  # the formula: ~44 calls a search


def search_diffrate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    target_macs: float,
    steps: int = 200,
    batch: int = 64,
    lr: float = 0.05,
    penalty: float = 20.0,
    seed: int = 0,
    compress_first: bool = False,
    distill: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Search per-block kept counts on ``images [N, 3|1, H, W]`` / ``labels [N]`` at ``target_macs``
    MACs per image; the backbone is frozen (only the kept-count distributions learn).

    Returns ``{"kept": {"prune_kept": [...], "merge_kept": [...]}, "macs": int, "learned_macs":
    int, "scale": float, "losses": [...], ...}``;
    ``kept`` counts tokens per block with the CLS token, as ``method="diffrate", kept=`` takes it.
    The learned counts are then multiplied by the largest factor that keeps the MACs within
    ``target_macs`` (``"scale"`` in the result; ``"learned_macs"`` is before), so the schedule
    spends the budget as the search allocated it. Block 0 stays uncompressed, as in DiffRate, unless
    ``compress_first`` (a budget below what the other blocks can reach needs it).
    ``distill`` replaces the labels by the unmerged model's logits (:func:`tomec.train.common.task_loss`).
    """
    from tqdm import tqdm

    vit.vit_blocks(model, "the DiffRate search")
    dims = vit_dims(model)
    if dims.protected != 1 or getattr(model, "cls_token", None) is None:
        raise ConfigError(
            f"the DiffRate search needs a ViT with exactly one CLS token as its prefix, got "
            f"{dims.protected} prefix tokens"
        )
    full = float(schedule_macs(model, {"prune_kept": [dims.num_tokens] * dims.num_blocks,
                                       "merge_kept": [dims.num_tokens] * dims.num_blocks}))
    if not 0 < target_macs <= full:
        raise ConfigError(f"target_macs={target_macs:.4g} must be in (0, {full:.4g}] (the unmerged MACs)")
    patches = dims.num_tokens - 1
    floor = schedule_macs(model, _one_patch_schedule(dims.num_tokens, dims.num_blocks, compress_first))
    if target_macs < floor:
        raise ConfigError(
            f"target_macs={target_macs:.4g} is below the {floor:.4g} MACs of keeping one patch token "
            f"per block" + ("" if compress_first else " after block 0 (compress_first=True lowers it)")
        )
    g = torch.Generator().manual_seed(seed)
    prune = nn.ModuleList(KeptCount(patches) for _ in range(dims.num_blocks))
    merge = nn.ModuleList(KeptCount(patches) for _ in range(dims.num_blocks))
    proxies = nn.ModuleList([prune, merge]).to(images.device)
    opt = torch.optim.Adam(proxies.parameters(), lr=lr)
    # a decaying step lets the counts settle instead of ending wherever the batch noise left them
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    losses, ratios = [], []
    multiplier = 0.0
    with frozen(model):
        for _ in tqdm(range(steps), desc="diffrate search", disable=not progress):
            pick = torch.randint(0, len(labels), (batch,), generator=g).to(images.device)
            logits, macs = masked_forward(model, images[pick], prune, merge, compress_first)
            with torch.no_grad():
                teacher = model(images[pick]) if distill else None
            task = task_loss(logits, labels[pick], teacher)
            gap = macs / full - target_macs / full
            loss = task + multiplier * gap + penalty * gap**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
            # Method of multipliers (equality form: the multiplier also goes negative below the
            # target): a plain penalty settles where its pull equals the task loss's, 20% above the
            # target on the digits ViT. The search still ends near, not on, the budget; the final
            # factor below closes the rest.
            multiplier += 2.0 * penalty * float(gap.detach())
            losses.append(float(task.detach()))
            ratios.append(float(macs.detach()) / full)
    kept = _kept_schedule(prune, merge, dims.num_tokens, compress_first)
    learned = schedule_macs(model, kept)
    # Multiply every learned count by the one factor that meets the budget: the search learns the
    # allocation across blocks; where its noisy end left the total above or below the budget, the
    # factor fixes that without undoing the allocation (cutting the last blocks, as before, did).
    def fitted(factor: float) -> dict[str, list[int]]:
        return _kept_schedule(prune, merge, dims.num_tokens, compress_first, factor)

    low, high = 0.0, float(patches)
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if schedule_macs(model, fitted(mid)) <= target_macs else (low, mid)
    scale, kept = low, fitted(low)  # at factor 0 every block keeps one patch: within the floor
    return {"kept": kept, "macs": schedule_macs(model, kept), "target_macs": target_macs,
            "learned_macs": learned, "unmerged_macs": full, "scale": scale, "losses": losses,
            "macs_ratios": ratios}
