"""ToMe's bipartite matching as one Triton launch per layer: keys in, destination map out.

One program per image. Phase 0 sums the keys over heads (``[B, H, N, d]``; ``H = 1`` for a ready
metric) into an fp32 scratch row per token with its inverse norm: the cosine is scale-invariant, so
the sum stands for ToMe's head mean. Phase 1 streams the B tokens (odd positions) tile by tile past each tile of
A tokens (even positions) and keeps the running best cosine score and its partner: the
``⌈N/2⌉ × ⌊N/2⌋`` score matrix never reaches memory. Phase 2 ranks the A tokens by best score
(pairwise counting: descending, ties to the lower index, exactly the order of a stable sort), picks
the top ``r`` as sources and writes every token's output slot in ToMe's order. Scores are computed
as ``(a · b) · (1/‖a‖) · (1/‖b‖)`` in fp32 (IEEE, no TF32: the matches are discrete decisions),
the same formula as the plain-PyTorch op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import TINY, padded


@triton.jit
def head_sum_keys(keys, metric, inv, n, H, stride_kh, stride_kn, stride_kd, D,
                  BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``0..n`` of one image: ``metric`` = keys summed over heads (fp32, row stride BLOCK_D) and
    ``inv`` = 1/‖row‖ (the first phase of both matching kernels)."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    for t0 in range(0, n, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        tmask = t < n
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for h in range(0, H):
            acc += tl.load(
                keys + h * stride_kh + t[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=tmask[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
        tl.store(metric + t[:, None] * BLOCK_D + offs_d[None, :], acc, mask=tmask[:, None])
        tl.store(inv + t, 1.0 / tl.maximum(tl.sqrt(tl.sum(acc * acc, axis=1)), TINY), mask=tmask)


def _tome_match_cost(grid, metadata, args):
    keys = args["keys_ptr"]
    batch, n, heads, d, bd = grid[0], args["N"], args["H"], args["D"], args["BLOCK_D"]
    n_a, n_b = (n + 1) // 2, n // 2
    pa, pb = padded(n_a, args["BLOCK_A"]), padded(n_b, args["BLOCK_B"])
    head_sum = n * heads * d + 3 * n * bd  # sums over heads, then the norms
    best = pa * pb * (2 * bd + 8)  # dot, scale, mask, running max
    rank = pa * pa * 4
    scratch = n * bd * 4
    moved = batch * (n * heads * d * keys.element_size() + 2 * scratch + n * 8 + n_a * 16)
    loads = batch * (n * heads * d * keys.element_size() + scratch + (pa // args["BLOCK_A"]) * n_b * bd * 4
                     + n_a * bd * 4 + pa * pa * 4 // args["BLOCK_A"] + n * 8)
    return {"flops": batch * (head_sum + best + rank), "bytes": moved, "loads": loads}


@triton.jit(launch_metadata=_tome_match_cost)
def _tome_match_kernel(
    keys_ptr,
    dest_ptr,
    metric_ptr,
    inv_ptr,
    best_ptr,
    partner_ptr,
    N,
    H,
    D,
    r,
    protected,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_db,
    stride_dn,
    DROP: tl.constexpr,
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
    keys = keys_ptr + img * stride_kb
    metric = metric_ptr + img * N * BLOCK_D
    inv = inv_ptr + img * N
    best_row = best_ptr + img * n_a
    partner_row = partner_ptr + img * n_a

    # Phase 0: metric = keys summed over heads (fp32), and 1/‖metric‖, one row per token.
    head_sum_keys(keys, metric, inv, N, H, stride_kh, stride_kn, stride_kd, D, BLOCK_A, BLOCK_D)

    tl.debug_barrier()

    # Phase 1: best partner of every A token, streaming over B tiles.
    for a0 in range(0, n_a, BLOCK_A):
        ia = a0 + tl.arange(0, BLOCK_A)
        amask = ia < n_a
        a = tl.load(metric + (2 * ia)[:, None] * BLOCK_D + offs_d[None, :], mask=amask[:, None], other=0.0)
        inv_a = tl.load(inv + 2 * ia, mask=amask, other=0.0)
        best = tl.full([BLOCK_A], float("-inf"), tl.float32)
        partner = tl.zeros([BLOCK_A], tl.int32)
        for b0 in range(0, n_b, BLOCK_B):
            jb = b0 + tl.arange(0, BLOCK_B)
            bmask = jb < n_b
            bt = tl.load(metric + (2 * jb + 1)[:, None] * BLOCK_D + offs_d[None, :], mask=bmask[:, None], other=0.0)
            inv_b = tl.load(inv + 2 * jb + 1, mask=bmask, other=0.0)
            dots = tl.dot(a, tl.trans(bt), input_precision="ieee")
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
        if DROP:  # ToFu's pruning: sources leave instead of merging
            partner_slot = tl.full([BLOCK_A], -1, tl.int32)
        slot = tl.where(is_prot, 2 * ia, tl.where(is_src, partner_slot, protected - 1 + kept_rank))
        tl.store(dest + (2 * ia) * stride_dn, slot.to(tl.int64), mask=amask)
    for b0 in range(0, n_b, BLOCK_B):
        jb = b0 + tl.arange(0, BLOCK_B)
        slot = tl.where(jb < prot_b, 2 * jb + 1, protected + n_kept_a + jb - prot_b)
        tl.store(dest + (2 * jb + 1) * stride_dn, slot.to(tl.int64), mask=jb < n_b)


def launch_tome_match(
    keys: torch.Tensor, r: int, protected: int, dest: torch.Tensor, drop_sources: bool = False
) -> None:
    """Fill ``dest [B, N]`` (int64) with ToMe's destination map.

    ``keys``: ``[B, H, N, d]`` (summed over heads here) or a metric ``[B, N, d]``;
    ``drop_sources``: the sources get ``-1`` (ToFu's pruning).
    """
    if keys.dim() == 3:
        keys = keys.unsqueeze(1)
    batch, heads, n, d = keys.shape
    n_a = (n + 1) // 2
    block_d = max(16, triton.next_power_of_2(d))
    metric = torch.empty(batch, n, block_d, device=keys.device, dtype=torch.float32)
    inv = torch.empty(batch, n, device=keys.device, dtype=torch.float32)
    best = torch.empty(batch, n_a, device=keys.device, dtype=torch.float32)
    partner = torch.empty(batch, n_a, device=keys.device, dtype=torch.int32)
    wrap_triton(_tome_match_kernel)[(batch,)](
        keys, dest, metric, inv, best, partner,
        n, heads, d, r, protected,
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        dest.stride(0), dest.stride(1),
        DROP=drop_sources, BLOCK_A=32, BLOCK_B=32, BLOCK_D=block_d,
    )


@triton_op("tomec::tome_match", mutates_args=())
def tome_match(keys: torch.Tensor, r: int, protected: int, drop_sources: bool = False) -> torch.Tensor:
    """``[B, H, N, d]`` keys (or a ``[B, N, d]`` metric) ``-> dest [B, N]`` int64: ToMe's bipartite
    matching (see :func:`tomec.ops.bipartite_match`)."""
    dest = torch.empty(keys.shape[0], keys.shape[-2], device=keys.device, dtype=torch.int64)
    launch_tome_match(keys, r, protected, dest, drop_sources)
    return dest


@tome_match.register_fake
def _(keys: torch.Tensor, r: int, protected: int, drop_sources: bool = False) -> torch.Tensor:
    return keys.new_empty(keys.shape[0], keys.shape[-2], dtype=torch.int64)
