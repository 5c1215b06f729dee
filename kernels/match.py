"""ToMe's bipartite matching as one Triton launch per layer: metric in, destination map out.

One program per image. Phase 1 streams the B tokens (odd positions) tile by tile past each tile of
A tokens (even positions) and keeps the running best cosine score and its partner: the
``⌈N/2⌉ × ⌊N/2⌋`` score matrix never reaches memory. Phase 2 ranks the A tokens by best score
(pairwise counting: descending, ties to the lower index, exactly the order of a stable sort), picks
the top ``r`` as sources and writes every token's output slot in ToMe's order. Scores are computed
as ``(a · b) · (1/‖a‖) · (1/‖b‖)`` in fp32, the same formula as the plain-PyTorch op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

TINY = 1.1754943508222875e-38  # smallest normal fp32: keeps an all-zero metric row finite


@triton.jit
def _tome_match_kernel(
    metric_ptr,
    dest_ptr,
    best_ptr,
    partner_ptr,
    N,
    D,
    r,
    protected,
    stride_mb,
    stride_mn,
    stride_md,
    stride_db,
    stride_dn,
    IEEE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    img = tl.program_id(0)
    n_a = (N + 1) // 2
    n_b = N // 2
    prot_a = (protected + 1) // 2
    prot_b = protected // 2
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    metric = metric_ptr + img * stride_mb
    best_row = best_ptr + img * n_a
    partner_row = partner_ptr + img * n_a

    # Phase 1: best partner of every A token, streaming over B tiles.
    for a0 in range(0, n_a, BLOCK_A):
        ia = a0 + tl.arange(0, BLOCK_A)
        amask = ia < n_a
        a = tl.load(
            metric + (2 * ia)[:, None] * stride_mn + offs_d[None, :] * stride_md,
            mask=amask[:, None] & dmask[None, :],
            other=0.0,
        )
        af = a.to(tl.float32)
        inv_a = 1.0 / tl.maximum(tl.sqrt(tl.sum(af * af, axis=1)), TINY)
        best = tl.full([BLOCK_A], float("-inf"), tl.float32)
        partner = tl.zeros([BLOCK_A], tl.int32)
        for b0 in range(0, n_b, BLOCK_B):
            jb = b0 + tl.arange(0, BLOCK_B)
            bmask = jb < n_b
            bt = tl.load(
                metric + (2 * jb + 1)[:, None] * stride_mn + offs_d[None, :] * stride_md,
                mask=bmask[:, None] & dmask[None, :],
                other=0.0,
            )
            bf = bt.to(tl.float32)
            inv_b = 1.0 / tl.maximum(tl.sqrt(tl.sum(bf * bf, axis=1)), TINY)
            if IEEE:
                dots = tl.dot(af, tl.trans(bf), input_precision="ieee")
            else:
                dots = tl.dot(a, tl.trans(bt), out_dtype=tl.float32)
            scores = dots * inv_a[:, None] * inv_b[None, :]
            allowed = (ia >= prot_a)[:, None] & (jb >= prot_b)[None, :] & bmask[None, :]
            scores = tl.where(allowed, scores, float("-inf"))
            tile_best = tl.max(scores, axis=1)
            tile_arg = tl.argmax(scores, axis=1, tie_break_left=True).to(tl.int32) + b0
            better = tile_best > best  # strict: an earlier tile (lower B index) keeps a tie
            best = tl.where(better, tile_best, best)
            partner = tl.where(better, tile_arg, partner)
        tl.store(best_row + ia, best, mask=amask)
        tl.store(partner_row + ia, partner, mask=amask)

    tl.debug_barrier()

    # Phase 2: rank by best score, choose the r sources, write the slots.
    n_kept_a = n_a - prot_a - r
    dest = dest_ptr + img * stride_db
    kept_before = 0
    for a0 in range(0, n_a, BLOCK_A):
        ia = a0 + tl.arange(0, BLOCK_A)
        amask = ia < n_a
        mine = tl.load(best_row + ia, mask=amask, other=float("-inf"))
        rank = tl.zeros([BLOCK_A], tl.int32)
        for j0 in range(0, n_a, BLOCK_A):
            jj = j0 + tl.arange(0, BLOCK_A)
            other = tl.load(best_row + jj, mask=jj < n_a, other=float("-inf"))
            ahead = (other[None, :] > mine[:, None]) | (
                (other[None, :] == mine[:, None]) & (jj[None, :] < ia[:, None])
            )
            rank += tl.sum((ahead & (jj < n_a)[None, :]).to(tl.int32), axis=1)
        is_src = rank < r
        is_prot = ia < prot_a
        kept = (~is_src) & (~is_prot) & amask
        kept_rank = tl.cumsum(kept.to(tl.int32), axis=0) + kept_before
        kept_before += tl.sum(kept.to(tl.int32), axis=0)
        partner = tl.load(partner_row + ia, mask=amask, other=0)
        partner_slot = tl.where(
            partner < prot_b, 2 * partner + 1, protected + n_kept_a + partner - prot_b
        )
        slot = tl.where(is_prot, 2 * ia, tl.where(is_src, partner_slot, protected - 1 + kept_rank))
        tl.store(dest + (2 * ia) * stride_dn, slot.to(tl.int64), mask=amask)
    for b0 in range(0, n_b, BLOCK_B):
        jb = b0 + tl.arange(0, BLOCK_B)
        slot = tl.where(jb < prot_b, 2 * jb + 1, protected + n_kept_a + jb - prot_b)
        tl.store(dest + (2 * jb + 1) * stride_dn, slot.to(tl.int64), mask=jb < n_b)


def launch_tome_match(metric: torch.Tensor, r: int, protected: int, dest: torch.Tensor) -> None:
    """Fill ``dest [B, N]`` (int64) with ToMe's destination map for ``metric [B, N, d]``."""
    batch, n, d = metric.shape
    n_a = (n + 1) // 2
    best = torch.empty(batch, n_a, device=metric.device, dtype=torch.float32)
    partner = torch.empty(batch, n_a, device=metric.device, dtype=torch.int32)
    block_d = max(16, triton.next_power_of_2(d))
    wrap_triton(_tome_match_kernel)[(batch,)](
        metric, dest, best, partner,
        n, d, r, protected,
        metric.stride(0), metric.stride(1), metric.stride(2),
        dest.stride(0), dest.stride(1),
        IEEE=metric.dtype == torch.float32 or metric.dtype == torch.float64,
        BLOCK_A=32, BLOCK_B=32, BLOCK_D=block_d,
    )


@triton_op("tomec::tome_match", mutates_args=())
def tome_match(metric: torch.Tensor, r: int, protected: int) -> torch.Tensor:
    """``[B, N, d] -> dest [B, N]`` int64: ToMe's bipartite matching (see :mod:`tomec.ops`)."""
    batch, n, _ = metric.shape
    dest = torch.empty(batch, n, device=metric.device, dtype=torch.int64)
    launch_tome_match(metric, r, protected, dest)
    return dest


@tome_match.register_fake
def _(metric: torch.Tensor, r: int, protected: int) -> torch.Tensor:
    batch, n, _ = metric.shape
    return metric.new_empty(batch, n, dtype=torch.int64)
