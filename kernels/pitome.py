"""PiToMe's energy-ordered matching as Triton launches: keys in, destination map out.

The non-protected tokens are head-summed into fp32 rows with inverse norms; every token's energy is
``mean_j ELU(cos_ij − margin)`` (the ``T × T`` similarity never reaches memory); the energy order
comes from pairwise ranks (descending, ties to the lower index); A and B alternate in that order
(all tokens with BSM, else the first ``2r`` places), each A token takes its best B partner (ties:
the lowest B place); with BSM the ``r`` A tokens with the best scores become sources (the radix
selection of :func:`tomec.kernels.match.top_r`), without it every A token does. Scores are
``(a · b) · (1/‖a‖) · (1/‖b‖)`` in fp32 (IEEE dot, correctly rounded square root and division).

Two plans, chosen by the launcher (:func:`plan_pitome`):

- **spread** (few images), five launches: the head sum (``_head_sum_kernel`` of
  tomec.kernels.match, a program per tile of tokens); ``_pitome_energy_kernel``, a program per
  (tile of rows, chunk of columns) writing the chunk's partial row sums; ``_pitome_order_kernel``,
  a program per tile of tokens that sums the chunks in increasing order, ranks its tokens against
  all and writes the energy order; ``_pitome_best_kernel``, a program per (tile of A places, chunk
  of B places) writing the chunk's best score and partner; ``_pitome_slots_kernel``, a program per
  image that combines the chunks (a later one wins only when strictly better), picks the sources
  and writes every slot.
- **per image** (many images), ``_pitome_kernel``: one program per image does every phase, with
  barriers between them. Its energy phase uses the symmetry of the cosine: each pair of row tiles
  is scored once, its row sums go to the first tile and its column sums to a scratch row of the
  second, which the second tile adds up in increasing tile order before its own sums (half the
  score arithmetic, the same order every run). A mirrored entry is ``(m_i · m_j) · inv_i · inv_j``
  for both rows: equal to PyTorch's ``cos_ji`` for exact inputs, at most an ulp off otherwise,
  which is below what the summation order of the energies already differs by.

Both plans are deterministic: no atomics, every sum in a fixed order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import cdiv, padded
from .match import (
    PER_IMAGE_FROM, SELECT_OPS, TARGET_PROGRAMS, chunk_columns, chunking, combine_chunks,
    head_sum_rows, keep_best, launch_head_sum, select_block, top_r,
)


# ---------------------------------------------------------------------------------------------
# jit helpers (shared by both plans)


@triton.jit
def energy_terms(mi, inv_i, metric, inv, j, jmask, margin, BLOCK_D: tl.constexpr):
    """``ELU(cos_ij − margin)`` of the rows ``mi`` against the scratch rows ``j`` (0 where ``jmask``
    is false): the terms of PiToMe's energy."""
    offs_d = tl.arange(0, BLOCK_D)
    mj = tl.load(metric + j[:, None] * BLOCK_D + offs_d[None, :], mask=jmask[:, None], other=0.0)
    inv_j = tl.load(inv + j, mask=jmask, other=0.0)
    shifted = tl.dot(mi, tl.trans(mj), input_precision="ieee") * inv_i[:, None] * inv_j[None, :] - margin
    elu = tl.where(shifted > 0, shifted, tl.exp(tl.minimum(shifted, 0.0)) - 1.0)
    return tl.where(jmask[None, :], elu, 0.0)


@triton.jit
def load_energy(part, j, jmask, n_chunks, t_all):
    """The energies of tokens ``j``: their partial row sums added in increasing chunk order, then
    divided by the token count (correctly rounded)."""
    total = tl.load(part + j, mask=jmask, other=0.0)
    for c in range(1, n_chunks):
        total += tl.load(part + c * t_all + j, mask=jmask, other=0.0)
    return tl.div_rn(total, tl.zeros_like(total) + t_all)


@triton.jit
def energy_places(part, i, imask, n_chunks, t_all, BLOCK_J: tl.constexpr):
    """Each token's place in the energy order (descending, ties to the lower index), counted
    against ``BLOCK_J`` tokens at a time."""
    mine = load_energy(part, i, imask, n_chunks, t_all)
    place = tl.zeros_like(i)
    for j0 in range(0, t_all, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        jmask = j < t_all
        other = load_energy(part, j, jmask, n_chunks, t_all)
        ahead = (other[None, :] > mine[:, None]) | ((other[None, :] == mine[:, None]) & (j[None, :] < i[:, None]))
        place += tl.sum((ahead & jmask[None, :]).to(tl.int32), axis=1)
    return place


@triton.jit
def stream_best_placed(ma, inv_a, metric, inv, order, j_start, j_end,
                       BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Best cosine of the A rows ``ma`` over the B places ``j_start <= b < j_end`` (the token at
    place ``2b + 1``) and its partner, the lowest such ``b`` (``j_start`` if none)."""
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    partner = tl.zeros([BLOCK_A], tl.int32) + j_start
    for b0 in range(j_start, j_end, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bmask = b < j_end
        tb = tl.load(order + 2 * b + 1, mask=bmask, other=0)
        mb = tl.load(metric + tb[:, None] * BLOCK_D + offs_d[None, :], mask=bmask[:, None], other=0.0)
        inv_b = tl.load(inv + tb, mask=bmask, other=0.0)
        cos = tl.dot(ma, tl.trans(mb), input_precision="ieee") * inv_a[:, None] * inv_b[None, :]
        best, partner = keep_best(best, partner, tl.where(bmask[None, :], cos, float("-inf")), b0)
    return best, partner


@triton.jit
def pitome_slots(order, best_row, partner_row, n_chunks, chunk_stride, dest, t_all, r, protected,
                 stride_dn, BSM: tl.constexpr, BLOCK_ALL: tl.constexpr):
    """Every slot of one image. Layout: protected, kept (energy order), then B (energy order)."""
    n_a = (t_all + 1) // 2 if BSM else r
    n_b = t_all // 2 if BSM else r
    n_kept = n_a - r if BSM else t_all - 2 * r
    lane = tl.arange(0, BLOCK_ALL)
    for p0 in range(0, protected, BLOCK_ALL):
        tl.store(dest + (p0 + lane) * stride_dn, (p0 + lane).to(tl.int64), mask=p0 + lane < protected)
    amask = lane < n_a
    best, partner = combine_chunks(best_row, partner_row, lane, amask, n_chunks, chunk_stride)
    slot_partner = protected + n_kept + partner
    if BSM:
        is_src = top_r(best, amask, r)
        kept_place = tl.cumsum(((~is_src) & amask).to(tl.int32), axis=0) - 1
        slot = tl.where(is_src, slot_partner, protected + kept_place)
    else:
        slot = slot_partner
    token = tl.load(order + 2 * lane, mask=amask, other=0)
    tl.store(dest + (protected + token) * stride_dn, slot.to(tl.int64), mask=amask)
    for b0 in range(0, n_b, BLOCK_ALL):
        b = b0 + lane
        bmask = b < n_b
        token = tl.load(order + 2 * b + 1, mask=bmask, other=0)
        tl.store(dest + (protected + token) * stride_dn, (protected + n_kept + b).to(tl.int64), mask=bmask)
    if not BSM:
        for q0 in range(2 * r, t_all, BLOCK_ALL):
            place = q0 + lane
            qmask = place < t_all
            token = tl.load(order + place, mask=qmask, other=0)
            tl.store(dest + (protected + token) * stride_dn, (protected + place - 2 * r).to(tl.int64), mask=qmask)


ORDER_ROWS = 16  # tokens ranked per program of the order kernel


def _warps(rows: int) -> int:
    """Warps of a tile kernel (2 for 16-row tiles: fewer registers at every head width)."""
    return 2 if rows <= 16 else 4


def _sides(t: int, r: int, bsm: bool) -> tuple[int, int]:
    return ((t + 1) // 2, t // 2) if bsm else (r, r)


def _slots_flops(n: int, t: int, r: int, bsm: bool, block: int, n_chunks: int) -> int:
    lanes = block * (3 * (n_chunks - 1) + 8 + (SELECT_OPS + 6 if bsm else 0))
    return lanes + padded(n, block) * 4  # the B, tail and protected stores


# ---------------------------------------------------------------------------------------------
# spread plan


class PitomePlan(NamedTuple):
    per_image: bool
    block: int = 32  # rows per tile (energy, order); the per-image plan's every tile
    block_c: int = 32  # energy columns per tile
    chunk_c: int = 0  # energy columns per chunk (a multiple of block_c)
    block_a: int = 32  # A places per tile
    block_b: int = 32  # B places per tile
    chunk_b: int = 0  # B places per chunk (a multiple of block_b)


def plan_pitome(batch: int, n: int, protected: int, r: int, bsm: bool) -> PitomePlan:
    """The launch plan for ``batch`` images of ``n`` tokens (see the module docstring)."""
    t = n - protected
    n_a, n_b = _sides(t, r, bsm)
    if batch >= PER_IMAGE_FROM or t <= 32:
        return PitomePlan(True)
    block = 16 if batch * cdiv(t, 32) < TARGET_PROGRAMS else 32
    chunk_c, _ = chunking(t, 32, batch * cdiv(t, block))
    block_a = 16 if batch * cdiv(n_a, 32) < TARGET_PROGRAMS else 32
    chunk_b, _ = chunking(n_b, 32, batch * cdiv(n_a, block_a))
    return PitomePlan(False, block, 32, chunk_c, block_a, 32, chunk_b)


def _energy_cost(grid, metadata, args):
    batch, row_tiles, n_chunks = grid
    t, bd, br, bc, chunk = args["t_all"], args["BLOCK_D"], args["BLOCK_R"], args["BLOCK_C"], args["chunk"]
    cols = chunk_columns(t, chunk, n_chunks, bc)
    flops = row_tiles * br * cols * (2 * bd + 8)  # dot, scale, margin, ELU, mask, sum
    row = bd * 4 + 4
    partial = n_chunks * t * 4
    moved = t * row + partial
    loads = n_chunks * t * row + row_tiles * t * row + partial  # columns re-read per row tile
    return {"flops": batch * flops, "bytes": batch * moved, "loads": batch * loads}


@triton.jit(launch_metadata=_energy_cost)
def _pitome_energy_kernel(metric_ptr, inv_ptr, part_ptr, t_all, margin, chunk, n_chunks,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (image, row tile, column chunk): the chunk's row sums of ``ELU(cos − margin)``."""
    img = tl.program_id(0).to(tl.int64)
    c = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    metric = metric_ptr + img * t_all * BLOCK_D
    inv = inv_ptr + img * t_all
    i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    imask = i < t_all
    mi = tl.load(metric + i[:, None] * BLOCK_D + offs_d[None, :], mask=imask[:, None], other=0.0)
    inv_i = tl.load(inv + i, mask=imask, other=0.0)
    j_start = c * chunk
    j_end = tl.minimum(j_start + chunk, t_all)
    total = tl.zeros([BLOCK_R], tl.float32)
    for j0 in range(j_start, j_end, BLOCK_C):
        j = j0 + tl.arange(0, BLOCK_C)
        jmask = j < j_end
        total += tl.sum(energy_terms(mi, inv_i, metric, inv, j, jmask, margin, BLOCK_D), axis=1)
    tl.store(part_ptr + (img * n_chunks + c) * t_all + i, total, mask=imask)


def _order_cost(grid, metadata, args):
    batch, tiles = grid
    t, n_chunks, block, block_j = args["t_all"], args["n_chunks"], args["BLOCK"], args["BLOCK_J"]
    pj = padded(t, block_j)
    flops = tiles * ((pj + block) * (n_chunks + 1) + block * pj * 5)  # combine, divide, places
    moved = n_chunks * t * 4 + t * 4
    loads = tiles * n_chunks * t * 4 + n_chunks * t * 4 + t * 4  # every program reads all energies
    return {"flops": batch * flops, "bytes": batch * moved, "loads": batch * loads}


@triton.jit(launch_metadata=_order_cost)
def _pitome_order_kernel(part_ptr, order_ptr, t_all, n_chunks, BLOCK: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program (image, token tile): the places of its tokens, ``order[place] = token``."""
    img = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    imask = i < t_all
    place = energy_places(part_ptr + img * n_chunks * t_all, i, imask, n_chunks, t_all, BLOCK_J)
    tl.store(order_ptr + img * t_all + place, i, mask=imask)


def _best_cost(grid, metadata, args):
    batch, a_tiles, n_chunks = grid
    t, n_a, n_b, bd = args["t_all"], args["n_a"], args["n_b"], args["BLOCK_D"]
    ba, bb, chunk = args["BLOCK_A"], args["BLOCK_B"], args["chunk"]
    cols = chunk_columns(n_b, chunk, n_chunks, bb)
    flops = a_tiles * ba * cols * (2 * bd + 8)
    row = bd * 4 + 4 + 4  # a scratch row, its inverse norm, its place in the order
    partial = n_chunks * n_a * 8
    moved = (n_a + n_b) * row + partial
    loads = n_chunks * n_a * row + a_tiles * n_b * row + partial
    return {"flops": batch * flops, "bytes": batch * moved, "loads": batch * loads}


@triton.jit(launch_metadata=_best_cost)
def _pitome_best_kernel(metric_ptr, inv_ptr, order_ptr, best_ptr, partner_ptr, t_all, n_a, n_b,
                        chunk, n_chunks,
                        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (image, A tile, B chunk): the chunk's best score and partner of every A place."""
    img = tl.program_id(0).to(tl.int64)
    c = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    metric = metric_ptr + img * t_all * BLOCK_D
    inv = inv_ptr + img * t_all
    order = order_ptr + img * t_all
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    amask = a < n_a
    ta = tl.load(order + 2 * a, mask=amask, other=0)
    ma = tl.load(metric + ta[:, None] * BLOCK_D + offs_d[None, :], mask=amask[:, None], other=0.0)
    inv_a = tl.load(inv + ta, mask=amask, other=0.0)
    j_start = c * chunk
    j_end = tl.minimum(j_start + chunk, n_b)
    best, partner = stream_best_placed(ma, inv_a, metric, inv, order, j_start, j_end,
                                       BLOCK_A, BLOCK_B, BLOCK_D)
    out = (img * n_chunks + c) * n_a + a
    tl.store(best_ptr + out, best, mask=amask)
    tl.store(partner_ptr + out, partner, mask=amask)


def _slots_cost(grid, metadata, args):
    batch, n, protected, r, n_chunks = grid[0], args["N"], args["protected"], args["r"], args["n_chunks"]
    bsm, block = args["BSM"], args["BLOCK_ALL"]
    t = n - protected
    n_a, _ = _sides(t, r, bsm)
    moved = n_chunks * n_a * 8 + t * 4 + n * 8  # partials, the order, dest
    return {"flops": batch * _slots_flops(n, t, r, bsm, block, n_chunks), "bytes": batch * moved,
            "loads": batch * moved}


@triton.jit(launch_metadata=_slots_cost)
def _pitome_slots_kernel(order_ptr, best_ptr, partner_ptr, dest_ptr, N, r, protected, n_chunks,
                         stride_db, stride_dn, BSM: tl.constexpr, BLOCK_ALL: tl.constexpr):
    """One program per image: sources and every slot from the chunks' partial best scores."""
    img = tl.program_id(0).to(tl.int64)
    t_all = N - protected
    n_a = (t_all + 1) // 2 if BSM else r
    base = img * n_chunks * n_a
    pitome_slots(order_ptr + img * t_all, best_ptr + base, partner_ptr + base, n_chunks, n_a,
                 dest_ptr + img * stride_db,
                 t_all, r, protected, stride_dn, BSM, BLOCK_ALL)


# ---------------------------------------------------------------------------------------------
# per-image plan


def _pitome_cost(grid, metadata, args):
    keys = args["keys_ptr"]
    batch, n, heads, d, bd, blk = grid[0], args["N"], args["H"], args["D"], args["BLOCK_D"], args["BLOCK"]
    t = n - args["protected"]
    tiles = cdiv(t, blk)
    head_sum = padded(t, blk) * (heads * bd + 3 * bd + 4)
    pairs = blk * blk * tiles * (tiles + 1) // 2  # the tiles on and above the diagonal
    energy = pairs * (2 * bd + 8) + (pairs - tiles * blk * blk) * 2  # + column sums off the diagonal
    key_bytes = t * heads * d * keys.element_size()
    row = bd * 4 + 4
    moved = key_bytes + 2 * t * row + t * 4  # keys in, rows and norms out and back, energies out
    loads = (key_bytes + t * (row + 4)  # phase 0: keys in, rows, norms and zeroed sums out
             + blk * tiles * (tiles + 1) // 2 * row  # phase 1: the row tiles on and right of the diagonal
             + 2 * t * 4 + tiles * (tiles - 1) * blk * 4)  # own sums; column sums in and out
    return {"flops": batch * (head_sum + energy), "bytes": batch * moved, "loads": batch * loads}


@triton.jit(launch_metadata=_pitome_cost)
def _pitome_kernel(
    keys_ptr, metric_ptr, inv_ptr, sums_ptr, N, H, D, protected, margin,
    stride_kb, stride_kh, stride_kn, stride_kd,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per image (the per-image plan): the head sums and every token's energy sum
    (``sums``, not yet divided by T), for :func:`_pitome_order_kernel` with one chunk."""
    img = tl.program_id(0).to(tl.int64)
    t_all = N - protected
    offs_d = tl.arange(0, BLOCK_D)
    keys = keys_ptr + img * stride_kb + protected * stride_kn
    metric = metric_ptr + img * t_all * BLOCK_D
    inv = inv_ptr + img * t_all
    sums = sums_ptr + img * t_all

    # Phase 0: head-summed keys and inverse norms of the non-protected tokens; sums zeroed.
    for i0 in range(0, t_all, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        imask = i < t_all
        acc, inv_i = head_sum_rows(keys, i, imask, H, stride_kh, stride_kn, stride_kd, D, BLOCK, BLOCK_D)
        tl.store(metric + i[:, None] * BLOCK_D + offs_d[None, :], acc, mask=imask[:, None])
        tl.store(inv + i, inv_i, mask=imask)
        tl.store(sums + i, tl.zeros([BLOCK], tl.float32), mask=imask)
    tl.debug_barrier()

    # Phase 1: row sums of ELU(cos - margin), each pair of tiles once. A row tile starts from the
    # column sums that earlier row tiles left in its entries (added in tile order), adds its
    # diagonal tile and the tiles to its right, whose column sums it leaves in turn.
    for i0 in range(0, t_all, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        imask = i < t_all
        mi = tl.load(metric + i[:, None] * BLOCK_D + offs_d[None, :], mask=imask[:, None], other=0.0)
        inv_i = tl.load(inv + i, mask=imask, other=0.0)
        total = tl.load(sums + i, mask=imask, other=0.0)
        for j0 in range(i0, t_all, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            jmask = j < t_all
            elu = tl.where(imask[:, None], energy_terms(mi, inv_i, metric, inv, j, jmask, margin, BLOCK_D), 0.0)
            total += tl.sum(elu, axis=1)
            right = jmask & (j0 > i0)  # off the diagonal: the column sums go to tile j
            left = tl.load(sums + j, mask=right, other=0.0)
            tl.store(sums + j, left + tl.sum(elu, axis=0), mask=right)
        tl.store(sums + i, total, mask=imask)
        tl.debug_barrier()


def launch_pitome_match(
    keys: torch.Tensor, r: int, protected: int, margin: float, bsm: bool, dest: torch.Tensor
) -> None:
    """Fill ``dest [B, N]`` (int64) with PiToMe's destination map (``r = 0``: the identity, as
    :func:`tomec.ops.pitome_match`).

    ``keys``: ``[B, H, N, d]`` (summed over heads here) or a metric ``[B, N, d]``.
    """
    if keys.dim() == 3:
        keys = keys.unsqueeze(1)
    batch, _, n, _ = keys.shape
    run_pitome_match(keys, r, protected, margin, bsm, dest, plan_pitome(batch, n, protected, r, bsm))


def run_pitome_match(keys: torch.Tensor, r: int, protected: int, margin: float, bsm: bool,
                     dest: torch.Tensor, plan: PitomePlan) -> None:
    """:func:`launch_pitome_match` with an explicit plan (``keys`` ``[B, H, N, d]``; tests pick
    small tiles here to cross tile and chunk boundaries at small N)."""
    batch, heads, n, d = keys.shape
    if r == 0:
        dest.copy_(torch.arange(n, device=dest.device).expand(batch, n))
        return
    t = n - protected
    n_a, n_b = _sides(t, r, bsm)
    block_d = max(16, triton.next_power_of_2(d))
    block_all, warps = select_block(n_a)
    block_j = min(128, max(32, triton.next_power_of_2(t)))  # order kernel: tokens ranked at a time
    device = keys.device
    f32 = dict(device=device, dtype=torch.float32)
    i32 = dict(device=device, dtype=torch.int32)
    order = torch.empty(batch, t, **i32)
    if plan.per_image:
        chunks_c = 1
        metric = torch.empty(batch, t, block_d, **f32)
        inv = torch.empty(batch, t, **f32)
        part = torch.empty(batch, 1, t, **f32)
        wrap_triton(_pitome_kernel)[(batch,)](
            keys, metric, inv, part, n, heads, d, protected, margin,
            keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
            BLOCK=plan.block, BLOCK_D=block_d,
            num_warps=8,  # at 4, sm_100's ptxas caps the registers at 72 and spills 28 B at fp16/bf16
        )
    else:
        metric, inv = launch_head_sum(keys, protected, t, block_d, wrap_triton)
        chunk_c = plan.chunk_c
        chunks_c = max(1, cdiv(t, chunk_c))
        part = torch.empty(batch, chunks_c, t, **f32)
        wrap_triton(_pitome_energy_kernel)[(batch, cdiv(t, plan.block), chunks_c)](
            metric, inv, part, t, margin, chunk_c, chunks_c,
            BLOCK_R=plan.block, BLOCK_C=plan.block_c, BLOCK_D=block_d, num_warps=_warps(plan.block),
        )
    wrap_triton(_pitome_order_kernel)[(batch, cdiv(t, ORDER_ROWS))](
        part, order, t, chunks_c, BLOCK=ORDER_ROWS, BLOCK_J=block_j,
    )
    chunk_b = plan.chunk_b if plan.chunk_b else padded(max(n_b, 1), plan.block_b)
    chunks_b = max(1, cdiv(n_b, chunk_b))
    best = torch.empty(batch, chunks_b, n_a, **f32)
    partner = torch.empty(batch, chunks_b, n_a, **i32)
    wrap_triton(_pitome_best_kernel)[(batch, cdiv(n_a, plan.block_a), chunks_b)](
        metric, inv, order, best, partner, t, n_a, n_b, chunk_b, chunks_b,
        BLOCK_A=plan.block_a, BLOCK_B=plan.block_b, BLOCK_D=block_d, num_warps=_warps(plan.block_a),
    )
    wrap_triton(_pitome_slots_kernel)[(batch,)](
        order, best, partner, dest, n, r, protected, chunks_b, dest.stride(0), dest.stride(1),
        BSM=bsm, BLOCK_ALL=block_all, num_warps=warps,
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
