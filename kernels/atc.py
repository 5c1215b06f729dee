"""ATC's average-linkage clustering in two Triton launches per block: distances in, cluster labels out.

The algorithm of the plain-PyTorch op ``tomec::atc_cluster``, with the same labels bit for bit, but
with each merge step's ``T × T`` scan for the first minimum replaced by cached row minima: ``O(T)``
work per step instead of ``O(T²)``.

- Launch 1, ``_atc_rowmin_kernel`` (programs over images × tiles of rows): each row's minimum of
  the initial linkage matrix (``dist``'s upper triangle mirrored, an inf diagonal) and the first
  column attaining it.
- Launch 2, ``_atc_cluster_kernel`` (one program per image: the steps are sequential, and a barrier
  across programs per step would cost more than the step) runs all ``n_merges`` steps:

  * The first minimum in row-major order is the smallest ``(value, row)`` among the row minima, at
    that row's cached column. A row's cache is exact, or *stale* (column -1): its value is then only
    a lower bound of the row's minimum, and the row is rescanned (its linkage row read back, the
    first minimum taken) when it is the smallest; an exact smallest row is the answer, as every
    other row's minimum is at least its own cached value. No finite live pair left (or a NaN):
    ``(0, 0)``, what PyTorch's flattened argmin gives over the inf diagonal.
  * Merging ``(i, j)`` (``i < j``) computes cluster ``i``'s new rows of distance *sums*
    ``S(i∪j, c) = S(i, c) + S(j, c)`` and of linkages ``S / (|i∪j|·|c|)``, every operation
    rounded once to ``dist``'s dtype, into this step's scratch slot.
  * The row minima: row ``i``'s from its new row; row ``j`` dies; every other row ``c`` changed
    only at column ``i`` (the new linkage) and ``j`` (now dead): it takes ``(L(c, i), i)`` if
    that beats its cache as a ``(value, column)`` pair (a stale row: if it is below its bound),
    turns stale if its cached column was ``i`` or ``j`` (the cached value stays a lower bound: the
    one changed entry did not beat it), and is unchanged otherwise. Exact caches stay the full
    scan's answer: the first minimum of a row is its smallest ``(value, column)`` pair.
  * A pair's current sum and linkage live in the slot of whichever of its clusters merged last
    (``stamp``: the step each cluster last merged at), in ``dist`` itself (``dist[min, max]``)
    while neither has: scratch is ``n_merges × T`` per image per matrix, each slot written once.
  * The row minima, cluster sizes (0: dead) and stamps stay in registers (``T`` lanes). Each dead
    cluster's destination goes to the output row; the labels resolve each point's cluster by
    pointer jumping and rank the live clusters (a cumulative sum).

Arithmetic matches PyTorch's to the bit: every operation is rounded once to the input dtype. fp16
and bf16 compute in fp32 and round (exact: a correctly rounded fp32 sum, product or quotient of two
fp16/bf16 values rounds to the correctly rounded fp16/bf16 result, as PyTorch computes it), the
division is ``div_rn`` (Triton's fp32 ``/`` is the approximate ``div.full.f32``), fp64 divides with
``/`` (``div.rn.f64``). A stored linkage equals ``S / (|A|·|C|)`` at the current sizes (a size
changes only when its row is rewritten; the product commutes), so a rescan reads exactly the
linkage PyTorch's matrix holds. A step's slot is read by other lanes only after the
``tl.debug_barrier()`` that follows its stores. Every reduction runs in a fixed order and every
decision is a comparison: the same bits every run.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import interpreting
from .common import H200, cdiv, log2_ceil, padded

MAX_T = 8192  # slot offsets (n_merges * T) stay within int32; stamps and columns pack in 14 bits

# Rescans per merge step that the cost declaration assumes. Counted with a PyTorch model of this
# kernel on cosine distances of Gaussian, clustered (4 to 32 clusters) and smooth image-like
# features, T = 196 and 576 at r = T / 8 and T / 4: 0.24 to 1.5 per step; uniform and tie-heavy
# integer distances: 0.1 to 1.6. (Rescanning every invalidated row at once instead: 1.3 to 4.7 on
# the same features, up to T / 9 with ties.) Worst case: every live row, every step.
RESCANS_PER_STEP = 1.5
# Vector operations per lane, counted from the code below: a compare, select, add, shift, load or
# store 1, a plain reduction 1, an index-carrying one (tl.min with indices) 7, the fp32 div.rn
# sequence 8, fp64 division 20; 16-bit dtypes add two conversions per rounding and one per row read.
_ROW_OPS = 17  # _slot_row on a never-merged row (a merged one: 8)
_STEP_OPS = (7 + 7 + 7 + 1  # argmin, `top`, count and stamp of i and j, the live mask
             + 2 * _ROW_OPS + 9 + 4 + 3  # rows i and j, the merged rows, their stores, sizes/stamps
             + 7 + 15)  # row i's minimum, the other rows' caches
_RESCAN_OPS = 1 + _ROW_OPS + 7 + 3 + 7 + 7  # the row, its minimum, its lanes, argmin and `top` again
_DIV_OPS = {False: 8, True: 20}
_ROUND_OPS = 3 * 2 + 2 + 2  # 16-bit: three roundings, two stores, two rows widened, per step


@triton.jit
def _slot_row(dist, slots, c, stamp_c, stamp, alive, cols, T, stride_di, stride_dj, WIDE: tl.constexpr):
    """Cluster ``c``'s current row of one matrix (sums or linkages: ``slots``), ``T`` lanes, inf at
    dead columns and at ``c``. Entry ``k`` is in the slot of whichever of ``c``, ``k`` merged last
    (column ``k`` of ``c``'s slot or column ``c`` of ``k``'s), in ``dist`` while neither has."""
    live = alive & (cols != c)
    if stamp_c < 0:  # c never merged: k's slot, or dist
        merged = stamp >= 0
        v = tl.load(slots + (stamp * T + c), mask=live & merged, other=float("inf"))
        orig = live & (stamp < 0)
        lo = tl.minimum(cols, c)
        hi = tl.maximum(cols, c)
        d = tl.load(dist + lo * stride_di + hi * stride_dj, mask=orig, other=float("inf"))
        v = tl.where(orig, d, v)
    else:
        offs = tl.where(stamp > stamp_c, stamp * T + c, stamp_c * T + cols)
        v = tl.load(slots + offs, mask=live, other=float("inf"))
    return v.to(WIDE)


def _rowmin_cost(grid, metadata, args):
    dist = args["dist_ptr"]
    es = dist.element_size()
    batch, t, bt, br = grid[0], args["T"], args["BLOCK_T"], args["BLOCK_R"]
    lanes = batch * padded(t, br) * bt
    # per lane: masks (4), mirrored offsets (min, max, two multiply-adds, the pointer), the load,
    # the row min, the first column attaining it (compare, select, min)
    flops = lanes * 14
    out = t * (es + 4)  # the row minima and their columns
    moved = batch * (t * (t + 1) // 2 * es + out)  # dist's upper triangle and diagonal
    loads = batch * (t * t * es + out)
    return {"flops": flops, "bytes": moved, "loads": loads}


@triton.jit(launch_metadata=_rowmin_cost)
def _atc_rowmin_kernel(
    dist_ptr,
    rmin_ptr,
    rarg_ptr,
    T,
    stride_db,
    stride_di,
    stride_dj,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_T)
    rmask = rows < T
    m = rmask[:, None] & (cols < T)[None, :] & (rows[:, None] != cols[None, :])
    lo = tl.minimum(rows[:, None], cols[None, :])
    hi = tl.maximum(rows[:, None], cols[None, :])
    d = tl.load(dist_ptr + img * stride_db + lo * stride_di + hi * stride_dj, mask=m, other=float("inf"))
    vmin = tl.min(d, 1)
    first = tl.min(tl.where(d == vmin[:, None], cols[None, :], BLOCK_T), 1)
    first = tl.where(first < T, first, 0)  # a NaN row: keep the column in range
    tl.store(rmin_ptr + img * T + rows, vmin, mask=rmask)
    tl.store(rarg_ptr + img * T + rows, first, mask=rmask)


def _atc_cost(grid, metadata, args):
    dist = args["dist_ptr"]
    batch, t, steps, jumps = grid[0], args["T"], args["n_merges"], args["n_jumps"]
    es = dist.element_size()
    bt = args["BLOCK_T"]
    lane_ops = _STEP_OPS + _DIV_OPS[bool(args["IS_F64"])] + RESCANS_PER_STEP * _RESCAN_OPS
    if es < 4:
        lane_ops += _ROUND_OPS + RESCANS_PER_STEP
    ends = 8 + 3 * jumps + 12  # the state and destinations set up; pointer jumping; ranks, labels
    read_rows = (2 + RESCANS_PER_STEP) * steps  # rows i and j, the rescans
    stored = 2 * steps * t * es  # each step's sums and linkage slots
    edges = t * (es + 4) + steps * 8  # row minima in, each step's destination out
    labels = t * 8 * (2 + 2 * jumps + 3)  # destinations set and read, jumps, ranks, labels
    moved = batch * (min(read_rows, t) * t * es + stored + edges + t * 8)
    loads = batch * (read_rows * t * es + stored + edges + labels)
    return {"flops": batch * bt * (steps * lane_ops + ends), "bytes": moved, "loads": loads}


@triton.jit(launch_metadata=_atc_cost)
def _atc_cluster_kernel(
    dist_ptr,
    sums_ptr,
    link_ptr,
    rmin_ptr,
    rarg_ptr,
    out_ptr,
    T,
    n_merges,
    n_jumps,
    stride_db,
    stride_di,
    stride_dj,
    stride_sb,
    stride_ob,
    stride_ot,
    IS_F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    LINKAGE: tl.constexpr,  # 0 average, 1 complete, 2 single
):
    img = tl.program_id(0).to(tl.int64)
    DT: tl.constexpr = sums_ptr.dtype.element_ty
    WIDE: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    dist = dist_ptr + img * stride_db
    sums = sums_ptr + img * stride_sb
    link = link_ptr + img * stride_sb
    out = out_ptr + img * stride_ob
    cols = tl.arange(0, BLOCK_T)
    cmask = cols < T
    inf_row = tl.full([BLOCK_T], float("inf"), WIDE)

    # The row minima and their first columns (launch 1); -1: stale; dead rows inf.
    rmin = tl.load(rmin_ptr + img * T + cols, mask=cmask, other=float("inf")).to(WIDE)
    rarg = tl.load(rarg_ptr + img * T + cols, mask=cmask, other=0)
    count = cmask.to(WIDE)  # cluster sizes (integers: exact in DT), 0: dead
    stamp = tl.full([BLOCK_T], -1, tl.int32)  # the step a cluster last merged at (its slot), -1: none
    # Each cluster's destination, in the output row: itself while it lives, the cluster it merged
    # into once it died (the labels follow the chains).
    tl.store(out + cols * stride_ot, cols.to(tl.int64), mask=cmask)
    tl.debug_barrier()  # before any step stores a destination
    for s in range(0, n_merges):
        # The smallest (row minimum, row); `top`: that row's stamp and cached column + 1 (0: stale)
        # in one reduction. A stale smallest row is rescanned, and the smallest taken again.
        best, i = tl.min(rmin, 0, return_indices=True, return_indices_tie_break_left=True)
        top = tl.max(tl.where(cols == i, ((stamp + 1) << 14) | (rarg + 1), -1), 0)
        while ((top & 16383) == 0) & (best < float("inf")):
            l_c = _slot_row(dist, link, i, (top >> 14) - 1, stamp, count > 0, cols, T, stride_di, stride_dj,
                            WIDE)
            m_c, a_c = tl.min(l_c, 0, return_indices=True, return_indices_tie_break_left=True)
            is_c = cols == i
            rmin = tl.where(is_c, m_c, rmin)
            rarg = tl.where(is_c, a_c, rarg)
            best, i = tl.min(rmin, 0, return_indices=True, return_indices_tie_break_left=True)
            top = tl.max(tl.where(cols == i, ((stamp + 1) << 14) | (rarg + 1), -1), 0)
        found = best < float("inf")  # else (or NaN): PyTorch's flattened argmin gives (0, 0)
        j = (top & 16383) - 1
        i = tl.where(found, i, 0)
        j = tl.where(found & (j >= 0) & (j < T), j, 0)

        is_i = cols == i
        is_j = cols == j
        alive = count > 0
        count_m = tl.sum(tl.where(is_i | is_j, count, 0.0), 0)  # exact: two integers and zeros
        count_m = tl.where(i == j, count_m + count_m, count_m).to(DT).to(WIDE)  # one rounding per op
        stamp_j = tl.max(tl.where(is_j, stamp, -1), 0)
        stamp_i = tl.where(found, (top >> 14) - 1, stamp_j)  # not found: i == j == 0
        s_i = _slot_row(dist, sums, i, stamp_i, stamp, alive, cols, T, stride_di, stride_dj, WIDE)
        s_j = _slot_row(dist, sums, j, stamp_j, stamp, alive, cols, T, stride_di, stride_dj, WIDE)
        # Lance-Williams on the sums: S(i∪j, c) = S(i, c) + S(j, c); linkage S / (|i∪j|·|c|). The
        # merged rows' live columns: not i, not j (i == j: no finite pair, rows i and j all inf).
        merging = alive & ~is_i & ~is_j & (i != j)
        if LINKAGE == 0:
            merged = tl.where(merging, (s_i + s_j).to(DT).to(WIDE), inf_row)
            prod = (count_m * count).to(DT).to(WIDE)
            if IS_F64:
                quot = merged / prod
            else:
                quot = tl.math.div_rn(merged, prod)
            link_i = tl.where(merging, quot.to(DT).to(WIDE), inf_row)
        else:  # complete / single: Lance-Williams max / min of the linkages (no rounding)
            if LINKAGE == 1:
                merged = tl.where(merging, tl.maximum(s_i, s_j), inf_row)
            else:
                merged = tl.where(merging, tl.minimum(s_i, s_j), inf_row)
            link_i = merged
        tl.store(sums + s * T + cols, merged.to(DT), mask=merging)
        tl.store(link + s * T + cols, link_i.to(DT), mask=merging)
        count = tl.where(is_j, 0.0, tl.where(is_i, count_m, count))
        stamp = tl.where(is_i, s, stamp)
        tl.store(out + j * stride_ot, i.to(tl.int64))

        # The caches: row i exact from its new row; row c takes (L(c, i), i) if that pair is below
        # (rmin, rarg) (a stale row's -1 makes a tie lose), else turns stale if its column was i
        # or j, else keeps its cache; a dead row's minimum is inf.
        m_i, a_i = tl.min(link_i, 0, return_indices=True, return_indices_tie_break_left=True)
        take = (link_i < rmin) | ((link_i == rmin) & (rarg >= i))
        rarg = tl.where(take, i, tl.where((rarg == i) | (rarg == j), -1, rarg))
        rmin = tl.where(take, link_i, rmin)
        rmin = tl.where(is_i, m_i, tl.where(count > 0, rmin, inf_row))
        rarg = tl.where(is_i, a_i, rarg)
        tl.debug_barrier()  # the step's slot is written before any lane reads it

    # Labels. Each point's cluster: pointer jumping over the destinations, ceil(log2(n_merges))
    # rounds (a chain passes at most n_merges dead clusters, each dying after the one before). Then
    # a live cluster's rank among the live ones (PyTorch's cumsum), gathered through the output row.
    tl.debug_barrier()
    dest = tl.load(out + cols * stride_ot, mask=cmask, other=0)
    for _ in range(0, n_jumps):
        dest = tl.load(out + dest * stride_ot, mask=cmask, other=0)
        tl.debug_barrier()
        tl.store(out + cols * stride_ot, dest, mask=cmask)
        tl.debug_barrier()
    rank = tl.cumsum((count > 0).to(tl.int32), 0) - 1
    tl.debug_barrier()
    tl.store(out + cols * stride_ot, rank.to(tl.int64), mask=cmask)
    tl.debug_barrier()
    labels = tl.load(out + dest * stride_ot, mask=cmask, other=0)
    tl.debug_barrier()
    tl.store(out + cols * stride_ot, labels, mask=cmask)


DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _num_warps(block_t: int) -> int:
    return 4 if block_t <= 256 else 8 if block_t <= 1024 else 16


LINKAGES = ("average", "complete", "single")  # the kernel's LINKAGE code is the index


def launch_atc_cluster(
    dist: torch.Tensor, n_merges: int, out: torch.Tensor, block_r: Optional[int] = None,
    linkage: str = "average",
) -> None:
    """Fill ``out [B, T]`` (int64) with the labels of ``n_merges`` merge steps of ``linkage``
    (average, complete or single) on ``dist [B, T, T]`` (upper triangle read), as
    ``tomec::atc_cluster`` computes them.
    ``block_r``: rows per program of the row-minima launch (a power of two; default: tiles of at
    most 4096 elements, at least ~2 programs per SM of an H100-class GPU where the rows allow)."""
    if dist.dim() != 3 or dist.shape[1] != dist.shape[2]:
        raise ValueError(f"dist must be [B, T, T], got {list(dist.shape)}")
    if dist.dtype not in DTYPES:
        raise ValueError(f"dist must be one of {DTYPES}, got {dist.dtype}")
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    batch, t, _ = dist.shape
    if t > MAX_T:
        raise ValueError(f"the ATC kernel supports T <= {MAX_T}, got {t}")
    if not 0 <= n_merges <= max(t - 1, 0):
        raise ValueError(f"n_merges={n_merges} is outside [0, {max(t - 1, 0)}] for T={t}")
    if out.shape != (batch, t) or out.dtype != torch.int64:
        raise ValueError(f"out must be int64 [{batch}, {t}], got {out.dtype} {list(out.shape)}")
    if batch == 0 or t == 0:
        return
    block_t = max(16, triton.next_power_of_2(t))
    if block_r is None:
        block_r = max(1, min(block_t, 4096 // block_t))
        # two programs per SM of an H100-class GPU where the rows allow (the interpreter pays per
        # program instead: one tile per image there)
        while block_r > 1 and batch * cdiv(t, block_r) < 2 * H200.sms and not interpreting():
            block_r //= 2
    rmin = torch.empty(batch, t, device=dist.device, dtype=dist.dtype)
    rarg = torch.empty(batch, t, device=dist.device, dtype=torch.int32)
    wrap_triton(_atc_rowmin_kernel)[(batch, cdiv(t, block_r))](
        dist, rmin, rarg, t, dist.stride(0), dist.stride(1), dist.stride(2),
        BLOCK_T=block_t, BLOCK_R=block_r, num_warps=4,
    )
    # one slot per merge step (at least one: no empty buffer reaches the launch)
    sums = torch.empty(batch, max(n_merges, 1), t, device=dist.device, dtype=dist.dtype)
    link = torch.empty_like(sums)
    wrap_triton(_atc_cluster_kernel)[(batch,)](
        dist, sums, link, rmin, rarg, out, t, n_merges, log2_ceil(n_merges),
        dist.stride(0), dist.stride(1), dist.stride(2), sums.stride(0), out.stride(0), out.stride(1),
        IS_F64=dist.dtype == torch.float64, BLOCK_T=block_t, LINKAGE=LINKAGES.index(linkage),
        num_warps=_num_warps(block_t),
    )


@triton_op("tomec::atc_cluster_triton", mutates_args=())
def atc_cluster_triton(dist: torch.Tensor, n_merges: int, linkage: str) -> torch.Tensor:
    """``dist [B, T, T]`` ``-> [B, T]`` int64: ``tomec::atc_cluster`` as two Triton launches."""
    out = torch.empty(dist.shape[0], dist.shape[1], device=dist.device, dtype=torch.int64)
    launch_atc_cluster(dist, n_merges, out, linkage=linkage)
    return out


@atc_cluster_triton.register_fake
def _(dist: torch.Tensor, n_merges: int, linkage: str) -> torch.Tensor:
    return dist.new_empty(dist.shape[:2], dtype=torch.int64)
