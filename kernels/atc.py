"""ATC's average-linkage clustering as one Triton launch per block: distances in, cluster labels out.

One program per image runs all ``n_merges`` merge steps (no host round trip, no atomics), the same
algorithm as the plain-PyTorch op ``tomec::atc_cluster``, bit for bit:

- Phase 0 mirrors the upper triangle of ``dist`` into two ``T × T`` scratch matrices per image, the
  Lance-Williams distance *sums* and the linkages ``S / (|A|·|C|)`` (both in ``dist``'s dtype), with
  an inf diagonal (inf: not a live pair).
- Each step finds the first minimum of the linkage matrix in row-major order (tiles of whole rows,
  a strict ``<`` across tiles: ties go to the smallest ``(i, j)``), then rewrites row and column
  ``i`` with ``S(i∪j, c) = S(i, c) + S(j, c)`` and its linkage, and row and column ``j`` with inf.
  Cluster sizes, each point's cluster and the live flags stay in registers (``T`` lanes).
- The labels: each point's cluster ranked among the live clusters (a cumulative sum), gathered
  through the output row.

Arithmetic matches PyTorch's to the bit: every operation is rounded once to the input dtype. fp16
and bf16 compute in fp32 and round (exact: a correctly rounded fp32 sum, product or quotient of two
fp16/bf16 values rounds to the correctly rounded fp16/bf16 result, as PyTorch computes it), the
division is ``div_rn`` (Triton's fp32 ``/`` is the approximate ``div.full.f32``), fp64 divides with
``/`` (``div.rn.f64``). The scratch rows a step writes overlap rows other lanes read, so the phases
are separated by ``tl.debug_barrier()``; writes that overlap within a phase store equal values.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

MAX_T = 8192  # T * T stays within int32 offsets; T lanes per vector


@triton.jit
def _round(x, DT: tl.constexpr, WIDE: tl.constexpr):
    """Round a WIDE value to the input dtype and widen it again (one rounding per PyTorch op)."""
    return x.to(DT).to(WIDE)


def _atc_cost(grid, metadata, args):
    dist = args["dist_ptr"]
    batch, t, steps = grid[0], args["T"], args["n_merges"]
    es = dist.element_size()
    bt = args["BLOCK_T"]
    per_step = t * bt * 3 + bt * 24  # the first minimum (compare, select, index), then rows i and j
    moved = batch * (t * t * es * 3 + t * 8)  # dist read, sums and linkages written
    loads = batch * (t * t * es * 3 + steps * (t * bt * es + 12 * bt * es) + t * 8)
    return {"flops": batch * (t * bt * 2 + steps * per_step), "bytes": moved, "loads": loads}


@triton.jit(launch_metadata=_atc_cost)
def _atc_cluster_kernel(
    dist_ptr,
    sums_ptr,
    link_ptr,
    out_ptr,
    T,
    n_merges,
    stride_db,
    stride_di,
    stride_dj,
    stride_ob,
    stride_ot,
    IS_F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    DT: tl.constexpr = sums_ptr.dtype.element_ty
    WIDE: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    dist = dist_ptr + img * stride_db
    sums = sums_ptr + img * T * T
    link = link_ptr + img * T * T
    out = out_ptr + img * stride_ob
    cols = tl.arange(0, BLOCK_T)
    cmask = cols < T
    inf_row = tl.full([BLOCK_T], float("inf"), WIDE)

    # Phase 0: sums = link = the mirrored upper triangle of dist, inf on the diagonal.
    for r0 in range(0, T, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < T)[:, None] & cmask[None, :]
        lo = tl.minimum(rows[:, None], cols[None, :])
        hi = tl.maximum(rows[:, None], cols[None, :])
        d = tl.load(dist + lo * stride_di + hi * stride_dj, mask=m, other=0.0)
        d = tl.where(rows[:, None] == cols[None, :], float("inf"), d.to(WIDE)).to(DT)
        offs = rows[:, None] * T + cols[None, :]
        tl.store(sums + offs, d, mask=m)
        tl.store(link + offs, d, mask=m)
    tl.debug_barrier()

    count = tl.full([BLOCK_T], 1.0, WIDE)  # cluster sizes (exact in DT: integers)
    parent = cols  # each point's cluster, by its lowest member
    alive = cmask.to(tl.int32)
    for _ in range(0, n_merges):
        # The first minimum of the linkage matrix in row-major order.
        best = tl.full([], float("inf"), WIDE)
        best_idx = tl.zeros([], tl.int32)
        for r0 in range(0, T, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = (rows < T)[:, None] & cmask[None, :]
            flat = rows[:, None] * T + cols[None, :]
            v = tl.load(link + flat, mask=m, other=float("inf")).to(WIDE)
            vmin = tl.min(v)
            first = tl.min(tl.where(v == vmin, flat, 2147483647))
            take = vmin < best
            best = tl.where(take, vmin, best)
            best_idx = tl.where(take, first, best_idx)
        i = best_idx // T
        j = best_idx % T

        # Lance-Williams on the sums: S(i∪j, c) = S(i, c) + S(j, c); linkage S / (|i∪j|·|c|).
        s_i = tl.load(sums + i * T + cols, mask=cmask, other=float("inf")).to(WIDE)
        s_j = tl.load(sums + j * T + cols, mask=cmask, other=float("inf")).to(WIDE)
        tl.debug_barrier()  # every lane has read rows i and j before any lane rewrites them
        # PyTorch's final values at (i, j) and (j, i) are inf (row j and column j are killed after
        # row i is written); when i == j (an all-inf matrix) rows and columns i are all inf.
        dead = (cols == j) | (i == j)
        merged = tl.where((cols == i) | dead, inf_row, _round(s_i + s_j, DT, WIDE))
        count_i = _round(tl.max(tl.where(cols == i, count, 0.0)) + tl.max(tl.where(cols == j, count, 0.0)),
                         DT, WIDE)
        count = tl.where(cols == i, count_i, count)
        prod = _round(count_i * count, DT, WIDE)
        if IS_F64:
            quot = merged / prod
        else:
            quot = tl.math.div_rn(merged, prod)
        merged_link = tl.where(dead, inf_row, _round(quot, DT, WIDE))
        tl.store(sums + i * T + cols, merged.to(DT), mask=cmask)
        tl.store(sums + cols * T + i, merged.to(DT), mask=cmask)
        tl.store(link + i * T + cols, merged_link.to(DT), mask=cmask)
        tl.store(link + cols * T + i, merged_link.to(DT), mask=cmask)
        inf_dt = inf_row.to(DT)
        tl.store(sums + j * T + cols, inf_dt, mask=cmask)
        tl.store(sums + cols * T + j, inf_dt, mask=cmask)
        tl.store(link + j * T + cols, inf_dt, mask=cmask)
        tl.store(link + cols * T + j, inf_dt, mask=cmask)
        alive = tl.where(cols == j, 0, alive)
        parent = tl.where(parent == j, i, parent)
        tl.debug_barrier()  # the next step reads what this one wrote

    # Labels: a live cluster's rank among the live ones, gathered per point through the output row.
    rank = tl.cumsum(alive, 0) - 1
    tl.store(out + cols * stride_ot, rank.to(tl.int64), mask=cmask)
    tl.debug_barrier()
    labels = tl.load(out + parent * stride_ot, mask=cmask, other=0)
    tl.debug_barrier()
    tl.store(out + cols * stride_ot, labels, mask=cmask)


DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def launch_atc_cluster(
    dist: torch.Tensor, n_merges: int, out: torch.Tensor, block_r: Optional[int] = None
) -> None:
    """Fill ``out [B, T]`` (int64) with the labels of ``n_merges`` average-linkage merge steps on
    ``dist [B, T, T]`` (upper triangle read), as ``tomec::atc_cluster`` computes them.
    ``block_r``: rows per argmin tile (a power of two; default: ~4096 elements per tile)."""
    if dist.dim() != 3 or dist.shape[1] != dist.shape[2]:
        raise ValueError(f"dist must be [B, T, T], got {list(dist.shape)}")
    if dist.dtype not in DTYPES:
        raise ValueError(f"dist must be one of {DTYPES}, got {dist.dtype}")
    batch, t, _ = dist.shape
    if t > MAX_T:
        raise ValueError(f"the ATC kernel supports T <= {MAX_T}, got {t}")
    if not 0 <= n_merges <= max(t - 1, 0):
        raise ValueError(f"n_merges={n_merges} is outside [0, {max(t - 1, 0)}] for T={t}")
    if out.shape != (batch, t) or out.dtype != torch.int64:
        raise ValueError(f"out must be int64 [{batch}, {t}], got {out.dtype} {list(out.shape)}")
    if batch == 0 or t == 0:
        return
    sums = torch.empty(batch, t, t, device=dist.device, dtype=dist.dtype)
    link = torch.empty_like(sums)
    block_t = max(16, triton.next_power_of_2(t))
    if block_r is None:
        block_r = max(1, min(block_t, 4096 // block_t))
    wrap_triton(_atc_cluster_kernel)[(batch,)](
        dist, sums, link, out, t, n_merges,
        dist.stride(0), dist.stride(1), dist.stride(2), out.stride(0), out.stride(1),
        IS_F64=dist.dtype == torch.float64, BLOCK_T=block_t, BLOCK_R=block_r,
        num_warps=4 if block_t <= 256 else 8,
    )


@triton_op("tomec::atc_cluster_triton", mutates_args=())
def atc_cluster_triton(dist: torch.Tensor, n_merges: int) -> torch.Tensor:
    """``dist [B, T, T]`` ``-> [B, T]`` int64: ``tomec::atc_cluster`` as one Triton launch."""
    out = torch.empty(dist.shape[0], dist.shape[1], device=dist.device, dtype=torch.int64)
    launch_atc_cluster(dist, n_merges, out)
    return out


@atc_cluster_triton.register_fake
def _(dist: torch.Tensor, n_merges: int) -> torch.Tensor:
    return dist.new_empty(dist.shape[:2], dtype=torch.int64)
