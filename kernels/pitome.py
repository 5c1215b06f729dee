"""PiToMe's energy-ordered matching as one Triton launch per layer: keys in, destination map out.

One program per image, in phases separated by barriers: (0) the head-summed keys of the
non-protected tokens and their inverse norms into an fp32 scratch; (1) every token's energy
``mean_j ELU(cos_ij − margin)``, streaming over column tiles, so the ``T × T`` similarity never
reaches memory; (2) the energy order (pairwise ranks, ties to the lower index); (3) the best partner
of every A token among the B tokens (only ``A × B`` scores, tile by tile); (4) ranks of the best
scores (the "bsm" variant), then every token's output slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import padded
from .match import head_sum_keys


def _pitome_cost(grid, metadata, args):
    keys = args["keys_ptr"]
    batch, n, heads, d, bd, blk = grid[0], args["N"], args["H"], args["D"], args["BLOCK_D"], args["BLOCK"]
    t = n - args["protected"]
    r = args["r"]
    n_a = (t + 1) // 2 if args["BSM"] else r
    n_b = t // 2 if args["BSM"] else r
    pt, pa, pb = padded(t, blk), padded(n_a, blk), padded(n_b, blk)
    head_sum = t * heads * d + 3 * t * bd
    energy = pt * pt * (2 * bd + 8)  # dot, scale, ELU, sum
    order = pt * pt * 4
    best = pa * pb * (2 * bd + 8)
    rank = pa * pa * 4 if args["BSM"] else 0
    scratch = t * bd * 4
    moved = batch * (t * heads * d * keys.element_size() + 2 * scratch + n * 8 + t * 12 + n_a * 8)
    tiles = pt // blk
    loads = batch * (t * heads * d * keys.element_size() + scratch + tiles * (t * bd * 4 + t * 4) * 2
                     + (pa // blk) * n_b * bd * 4 + n * 8)
    return {"flops": batch * (head_sum + energy + order + best + rank), "bytes": moved, "loads": loads}


@triton.jit(launch_metadata=_pitome_cost)
def _pitome_kernel(
    keys_ptr, dest_ptr, metric_ptr, inv_ptr, energy_ptr, order_ptr, best_ptr, partner_ptr,
    N, H, D, r, protected, margin,
    stride_kb, stride_kh, stride_kn, stride_kd, stride_db, stride_dn,
    BSM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    img = tl.program_id(0)
    t_all = N - protected
    offs_d = tl.arange(0, BLOCK_D)
    keys = keys_ptr + img * stride_kb + protected * stride_kn
    metric = metric_ptr + img * t_all * BLOCK_D
    inv = inv_ptr + img * t_all
    energy = energy_ptr + img * t_all
    order = order_ptr + img * t_all
    n_a = (t_all + 1) // 2 if BSM else r
    n_b = t_all // 2 if BSM else r
    best_row = best_ptr + img * n_a
    partner_row = partner_ptr + img * n_a
    dest = dest_ptr + img * stride_db

    # Phase 0: head-summed keys and inverse norms of the non-protected tokens.
    head_sum_keys(keys, metric, inv, t_all, H, stride_kh, stride_kn, stride_kd, D, BLOCK, BLOCK_D)
    tl.debug_barrier()

    # Phase 1: energies, one row tile at a time against every column tile.
    for i0 in range(0, t_all, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        imask = i < t_all
        mi = tl.load(metric + i[:, None] * BLOCK_D + offs_d[None, :], mask=imask[:, None], other=0.0)
        inv_i = tl.load(inv + i, mask=imask, other=0.0)
        total = tl.zeros([BLOCK], tl.float32)
        for j0 in range(0, t_all, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            jmask = j < t_all
            mj = tl.load(metric + j[:, None] * BLOCK_D + offs_d[None, :], mask=jmask[:, None], other=0.0)
            inv_j = tl.load(inv + j, mask=jmask, other=0.0)
            cos = tl.dot(mi, tl.trans(mj), input_precision="ieee") * inv_i[:, None] * inv_j[None, :]
            shifted = cos - margin
            elu = tl.where(shifted > 0, shifted, tl.exp(tl.minimum(shifted, 0.0)) - 1.0)
            total += tl.sum(tl.where(jmask[None, :], elu, 0.0), axis=1)
        tl.store(energy + i, total / t_all, mask=imask)
    tl.debug_barrier()

    # Phase 2: the energy order: order[place] = token.
    for i0 in range(0, t_all, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        imask = i < t_all
        mine = tl.load(energy + i, mask=imask, other=0.0)
        place = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, t_all, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            other = tl.load(energy + j, mask=j < t_all, other=0.0)
            ahead = (other[None, :] > mine[:, None]) | ((other[None, :] == mine[:, None]) & (j[None, :] < i[:, None]))
            place += tl.sum((ahead & (j < t_all)[None, :]).to(tl.int32), axis=1)
        tl.store(order + place, i, mask=imask)
    tl.debug_barrier()

    # Phase 3: A = places 0, 2, 4, ..., B = places 1, 3, 5, ... (the first 2r places unless BSM).
    for a0 in range(0, n_a, BLOCK):
        a = a0 + tl.arange(0, BLOCK)
        amask = a < n_a
        ta = tl.load(order + 2 * a, mask=amask, other=0)
        ma = tl.load(metric + ta[:, None] * BLOCK_D + offs_d[None, :], mask=amask[:, None], other=0.0)
        inv_a = tl.load(inv + ta, mask=amask, other=0.0)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        partner = tl.zeros([BLOCK], tl.int32)
        for b0 in range(0, n_b, BLOCK):
            b = b0 + tl.arange(0, BLOCK)
            bmask = b < n_b
            tb = tl.load(order + 2 * b + 1, mask=bmask, other=0)
            mb = tl.load(metric + tb[:, None] * BLOCK_D + offs_d[None, :], mask=bmask[:, None], other=0.0)
            inv_b = tl.load(inv + tb, mask=bmask, other=0.0)
            cos = tl.dot(ma, tl.trans(mb), input_precision="ieee") * inv_a[:, None] * inv_b[None, :]
            cos = tl.where(bmask[None, :], cos, float("-inf"))
            tile_best = tl.max(cos, axis=1)
            tile_arg = tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int32) + b0
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            partner = tl.where(better, tile_arg, partner)
        tl.store(best_row + a, best, mask=amask)
        tl.store(partner_row + a, partner, mask=amask)
    tl.debug_barrier()

    # Phase 4: slots. Layout: protected, kept (energy order), then B (energy order).
    p = tl.arange(0, BLOCK)
    for p0 in range(0, protected, BLOCK):
        tl.store(dest + (p0 + p) * stride_dn, (p0 + p).to(tl.int64), mask=p0 + p < protected)
    n_kept = t_all - n_b - r if BSM else t_all - 2 * r
    kept_before = 0
    for a0 in range(0, n_a, BLOCK):
        a = a0 + tl.arange(0, BLOCK)
        amask = a < n_a
        partner = tl.load(partner_row + a, mask=amask, other=0)
        slot_partner = protected + n_kept + partner
        if BSM:
            mine = tl.load(best_row + a, mask=amask, other=float("-inf"))
            rank = tl.zeros([BLOCK], tl.int32)
            for j0 in range(0, n_a, BLOCK):
                j = j0 + tl.arange(0, BLOCK)
                other = tl.load(best_row + j, mask=j < n_a, other=float("-inf"))
                ahead = (other[None, :] > mine[:, None]) | ((other[None, :] == mine[:, None]) & (j[None, :] < a[:, None]))
                rank += tl.sum((ahead & (j < n_a)[None, :]).to(tl.int32), axis=1)
            is_src = rank < r
            kept = (~is_src) & amask
            kept_place = tl.cumsum(kept.to(tl.int32), axis=0) + kept_before - 1
            kept_before += tl.sum(kept.to(tl.int32), axis=0)
            slot = tl.where(is_src, slot_partner, protected + kept_place)
        else:
            slot = slot_partner
        token = tl.load(order + 2 * a, mask=amask, other=0)
        tl.store(dest + (protected + token) * stride_dn, slot.to(tl.int64), mask=amask)
    for b0 in range(0, n_b, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        bmask = b < n_b
        token = tl.load(order + 2 * b + 1, mask=bmask, other=0)
        tl.store(dest + (protected + token) * stride_dn, (protected + n_kept + b).to(tl.int64), mask=bmask)
    if not BSM:
        for q0 in range(2 * r, t_all, BLOCK):
            place = q0 + tl.arange(0, BLOCK)
            qmask = place < t_all
            token = tl.load(order + place, mask=qmask, other=0)
            tl.store(dest + (protected + token) * stride_dn, (protected + place - 2 * r).to(tl.int64), mask=qmask)


def launch_pitome_match(
    keys: torch.Tensor, r: int, protected: int, margin: float, bsm: bool, dest: torch.Tensor
) -> None:
    """Fill ``dest [B, N]`` (int64) with PiToMe's destination map (``r >= 1``).

    ``keys``: ``[B, H, N, d]`` (summed over heads here) or a metric ``[B, N, d]``.
    """
    if keys.dim() == 3:
        keys = keys.unsqueeze(1)
    batch, heads, n, d = keys.shape
    t = n - protected
    n_a = (t + 1) // 2 if bsm else r
    block_d = max(16, triton.next_power_of_2(d))
    device = keys.device
    f32 = dict(device=device, dtype=torch.float32)
    metric = torch.empty(batch, t, block_d, **f32)
    inv, energy = torch.empty(batch, t, **f32), torch.empty(batch, t, **f32)
    order = torch.empty(batch, t, device=device, dtype=torch.int32)
    best = torch.empty(batch, n_a, **f32)
    partner = torch.empty(batch, n_a, device=device, dtype=torch.int32)
    wrap_triton(_pitome_kernel)[(batch,)](
        keys, dest, metric, inv, energy, order, best, partner,
        n, heads, d, r, protected, margin,
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        dest.stride(0), dest.stride(1),
        BSM=bsm, BLOCK=32, BLOCK_D=block_d,
    )


@triton_op("tomec::pitome_match", mutates_args=())
def pitome_match(keys: torch.Tensor, r: int, protected: int, margin: float, bsm: bool) -> torch.Tensor:
    """``[B, H, N, d]`` keys (or ``[B, N, d]``) ``-> dest [B, N]`` int64: PiToMe's matching (see
    :func:`tomec.ops.pitome_match`)."""
    dest = torch.empty(keys.shape[0], keys.shape[-2], device=keys.device, dtype=torch.int64)
    launch_pitome_match(keys, r, protected, margin, bsm, dest)
    return dest


@pitome_match.register_fake
def _(keys: torch.Tensor, r: int, protected: int, margin: float, bsm: bool) -> torch.Tensor:
    return keys.new_empty(keys.shape[0], keys.shape[-2], dtype=torch.int64)
