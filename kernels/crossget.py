"""CrossGET's hot step: each token's best partner over the complete graph, without the ``N × N`` matrix.

Which columns a row may pick is given by two integer keys: column ``j`` is allowed for row ``i`` when
``col_key[j] > row_key[i]`` (and ``j != i``, neither of them protected). CrossGET uses it three times:

- every column (``row_key = -1``, ``col_key = 0``): each token's best similarity;
- the columns ranked after the row (``row_key = col_key = rank``): the adjusted similarity;
- the non-source columns (``row_key = 0``, ``col_key = 1`` for a non-source): the destination.

The cosine is the PyTorch op's formula with the same roundings: ``s_ij = (a_i · a_j) · inv_i · inv_j``
(in that order) with the inverse norms given, and the symmetric value ``(s_ij + s_ji) / 2`` written as
``s_ij · ½ + s_ji · ½`` (the same number, as halving is exact, and one that a fused multiply-add
cannot change). The dot products are fp32 (IEEE, no TF32); their summation order is Triton's.
A row with no allowed column gets ``-inf`` and index 0 (as ``torch.max`` does).

Work split (two launches, both a fixed order, no atomics):

1. ``_crossget_pairs_kernel``: the tokens are cut into ``T`` square tiles of ``BLOCK`` and one program
   per (unordered pair of tiles ``{I, J}``, image) computes the similarity block ``I × J`` once and
   reduces it both ways: the rows of ``I`` over the columns of ``J`` (a row maximum) and the rows of
   ``J`` over the columns of ``I`` (a column maximum: the same numbers, as the value is symmetric).
   Each writes a partial ``(max, first argmax)`` per (row, column tile) to a ``[B, T, N]`` scratch;
   every entry is written by exactly one program. The symmetric half of the work is not recomputed,
   and each pair's dot product is computed once, so ``sym[i, j]`` and ``sym[j, i]`` are the same bits
   by construction (a diagonal tile takes its lower triangle from the transpose of its upper one):
   a mutual best pair ties exactly, whatever the dot's summation order.
   The pairs are enumerated as ``(I, (I + k) mod T)`` for ``k = 0 .. ⌊T/2⌋`` (for even ``T`` the last
   ``k`` only for ``I < T/2``): ``T (T + 1) / 2`` programs per image, no idle ones.
2. ``_crossget_combine_kernel``: per row, the ``T`` partials in increasing column-tile order, in
   chunks of ``BLOCK_T``: a chunk's first maximum (the lowest tile among equals), kept over the
   running one on a strict ``>``. The lowest column wins a tie, exactly as ``torch.max``; a row whose
   partials are all ``-inf`` keeps ``(-inf, 0)``.

Tiles of 16 at batch 1 (ViT-B's 197 tokens: 91 programs, ViT-L's 577: 703), of 32 once the batch
gives every SM several programs (see :func:`_tile`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import H200, cdiv, padded


def _pairs(tiles: int) -> int:
    return tiles * (tiles + 1) // 2


def _crossget_pairs_cost(grid, metadata, args):
    metric = args["metric_ptr"]
    batch, n, d = metric.shape
    bt, bd, tiles = args["BLOCK"], args["BLOCK_D"], args["tiles"]
    pairs = _pairs(tiles)
    pd = padded(d, bd)
    es = metric.element_size()
    # every block: the dot, the two scalings and the symmetrization (7), the allowed base (3), the
    # row side (key compare, and, select: 3; the max/first-argmax reduction: 7); off the diagonal the
    # column side (10); on it the lower triangle from the transpose (compare, select: 2)
    flops = batch * bt * bt * (pairs * (2 * pd + 20) + (pairs - tiles) * 10 + tiles * 2)
    moved = batch * (n * d * es + n * (4 + 8 + 8) + tiles * n * (4 + 4))
    # two tiles of metric rows and inverse norms, the row side's two keys, off the diagonal the
    # column side's two; one partial (best, arg) per row and side stored
    loads = batch * (pairs * 2 * bt * (d * es + 4 + 8) + (pairs - tiles) * 2 * bt * 8
                     + (2 * pairs - tiles) * bt * (4 + 4))
    return {"flops": flops, "bytes": moved, "loads": loads}


@triton.jit(launch_metadata=_crossget_pairs_cost)
def _crossget_pairs_kernel(
    metric_ptr, inv_ptr, row_key_ptr, col_key_ptr, part_best_ptr, part_arg_ptr,
    N, D, tiles, protected,
    stride_mb, stride_mn, stride_md, stride_ib, stride_in,
    stride_rb, stride_rn, stride_cb, stride_cn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # int64 indices throughout (no int32 overflow to think of, and none for the interpreter to check)
    pair = tl.program_id(0).to(tl.int64)
    img = tl.program_id(1).to(tl.int64)
    ti = pair % tiles  # the block's rows
    tj = (ti + pair // tiles) % tiles  # the block's columns
    offs = tl.arange(0, BLOCK).to(tl.int64)
    offs_m = ti * BLOCK + offs
    offs_n = tj * BLOCK + offs
    mmask = offs_m < N
    nmask = offs_n < N
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    metric = metric_ptr + img * stride_mb
    a_ptrs = metric + offs_m[:, None] * stride_mn + offs_d[None, :] * stride_md
    b_ptrs = metric + offs_n[:, None] * stride_mn + offs_d[None, :] * stride_md
    step = BLOCK_D * stride_md
    dots = tl.zeros([BLOCK, BLOCK], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dmask = offs_d < D - d0
        a = tl.load(a_ptrs, mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        dots += tl.dot(a, tl.trans(b), input_precision="ieee")
        a_ptrs += step
        b_ptrs += step
    if ti == tj:  # one dot per pair: the lower triangle is the upper one transposed
        dots = tl.where(offs_m[:, None] <= offs_n[None, :], dots, tl.trans(dots))
    inv = inv_ptr + img * stride_ib
    inv_i = tl.load(inv + offs_m * stride_in, mask=mmask, other=0.0)
    inv_j = tl.load(inv + offs_n * stride_in, mask=nmask, other=0.0)
    s_ij = dots * inv_i[:, None] * inv_j[None, :]  # the op's sim[i, j]
    s_ji = dots * inv_j[None, :] * inv_i[:, None]  # the op's sim[j, i]
    sym = s_ij * 0.5 + s_ji * 0.5  # sym[i, j], which is also sym[j, i]
    ok_i = mmask & (offs_m >= protected)
    ok_j = nmask & (offs_n >= protected)
    base = ok_i[:, None] & ok_j[None, :] & (offs_m[:, None] != offs_n[None, :])
    row_key = row_key_ptr + img * stride_rb
    col_key = col_key_ptr + img * stride_cb
    part = img * tiles * N
    # the rows of tile I over the columns of tile J: partial (max, first argmax) for column tile J
    row_key_i = tl.load(row_key + offs_m * stride_rn, mask=mmask, other=0)
    col_key_j = tl.load(col_key + offs_n * stride_cn, mask=nmask, other=0)
    val = tl.where(base & (col_key_j[None, :] > row_key_i[:, None]), sym, float("-inf"))
    best, arg = tl.max(val, axis=1, return_indices=True, return_indices_tie_break_left=True)
    tl.store(part_best_ptr + part + tj * N + offs_m, best, mask=mmask)
    tl.store(part_arg_ptr + part + tj * N + offs_m, tj * BLOCK + arg, mask=mmask)
    if ti != tj:  # the rows of tile J over the columns of tile I (the block's columns): for tile I
        row_key_j = tl.load(row_key + offs_n * stride_rn, mask=nmask, other=0)
        col_key_i = tl.load(col_key + offs_m * stride_cn, mask=mmask, other=0)
        val_t = tl.where(base & (col_key_i[:, None] > row_key_j[None, :]), sym, float("-inf"))
        best_t, arg_t = tl.max(val_t, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(part_best_ptr + part + ti * N + offs_n, best_t, mask=nmask)
        tl.store(part_arg_ptr + part + ti * N + offs_n, ti * BLOCK + arg_t, mask=nmask)


def _crossget_combine_cost(grid, metadata, args):
    batch, tiles, n = args["part_best_ptr"].shape
    bt, br = args["BLOCK_T"], args["BLOCK_R"]
    pr = padded(n, br)
    # per chunk of BLOCK_T partials: the max/first-argmax reduction (7 per partial), the strict
    # compare and two selects against the running pair
    flops = batch * pr * (padded(tiles, bt) * 7 + cdiv(tiles, bt) * 3)
    moved = batch * (tiles * n * (4 + 4) + n * (4 + 8))
    loads = moved + batch * cdiv(tiles, bt) * n * 4  # the winning partial's index, gathered
    return {"flops": flops, "bytes": moved, "loads": loads}


@triton.jit(launch_metadata=_crossget_combine_cost)
def _crossget_combine_kernel(
    part_best_ptr, part_arg_ptr, best_ptr, arg_ptr, N, tiles,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    img = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    mask = offs < N
    offs_t = tl.arange(0, BLOCK_T).to(tl.int64)
    part = img * tiles * N
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_R], tl.int32)
    for t0 in range(0, tiles, BLOCK_T):  # chunks of column tiles, in increasing order
        t = t0 + offs_t
        vals = tl.load(part_best_ptr + part + t[:, None] * N + offs[None, :],
                       mask=(t < tiles)[:, None] & mask[None, :], other=float("-inf"))
        chunk_best, which = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
        chunk_arg = tl.load(part_arg_ptr + part + (t0 + which) * N + offs,
                            mask=mask & (t0 + which < tiles), other=0)  # (NaN inputs: stay in bounds)
        better = chunk_best > best  # strict: an earlier chunk (lower columns) keeps a tie
        best = tl.where(better, chunk_best, best)
        arg = tl.where(better, chunk_arg, arg)
    tl.store(best_ptr + img * N + offs, best, mask=mask)
    tl.store(arg_ptr + img * N + offs, arg.to(tl.int64), mask=mask)


def _tile(batch: int, n: int) -> int:
    """The square tile: 16 where an image needs the finer grid to spread over the SMs (more than four
    tiles of 32 and too few programs from the batch), else 32 (fewer, larger programs: less re-reading
    and per-program overhead; below 129 tokens the launch is a handful of programs either way)."""
    return 16 if n > 128 and batch * _pairs(cdiv(n, 32)) < 4 * H200.sms else 32


def launch_crossget_rowmax(
    metric: torch.Tensor, inv: torch.Tensor, row_key: torch.Tensor, col_key: torch.Tensor,
    protected: int, best: torch.Tensor, arg: torch.Tensor, block: Optional[int] = None,
) -> None:
    """Fill ``best [B, N]`` (fp32, contiguous) and ``arg [B, N]`` (int64, contiguous) with each row's
    maximum and first argmax of the symmetric cosine over its allowed columns.

    ``metric [B, N, d]`` (fp32 or fp16, any strides), ``inv [B, N]`` fp32 its inverse row norms,
    ``row_key, col_key [B, N]`` integers: column ``j`` is allowed for row ``i`` when
    ``col_key[j] > row_key[i]``, ``j != i`` and both are ``>= protected``. ``block``: the edge of
    the square tiles, 16 or 32 (None: chosen from the shape); the result does not depend on it
    but for the dot products' summation order.
    """
    batch, n, d = metric.shape
    block = _tile(batch, n) if block is None else block
    if block not in (16, 32):
        raise ValueError(f"crossget_rowmax: block must be 16 or 32, not {block}")
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    tiles = triton.cdiv(n, block)
    part_best = torch.empty(batch, tiles, n, device=metric.device, dtype=torch.float32)
    part_arg = torch.empty(batch, tiles, n, device=metric.device, dtype=torch.int32)
    wrap_triton(_crossget_pairs_kernel)[(_pairs(tiles), batch)](
        metric, inv, row_key, col_key, part_best, part_arg,
        n, d, tiles, protected,
        metric.stride(0), metric.stride(1), metric.stride(2), inv.stride(0), inv.stride(1),
        row_key.stride(0), row_key.stride(1), col_key.stride(0), col_key.stride(1),
        BLOCK=block, BLOCK_D=block_d, num_warps=2 if block == 16 else 8,
    )
    block_r = 64
    wrap_triton(_crossget_combine_kernel)[(triton.cdiv(n, block_r), batch)](
        part_best, part_arg, best, arg, n, tiles,
        BLOCK_T=4, BLOCK_R=block_r, num_warps=2,
    )


@triton_op("tomec::crossget_rowmax", mutates_args=())
def crossget_rowmax(
    metric: torch.Tensor, inv: torch.Tensor, row_key: torch.Tensor, col_key: torch.Tensor, protected: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``metric [B, N, d]``, ``inv [B, N]``, ``row_key, col_key [B, N]`` ``-> (best [B, N] fp32,
    arg [B, N] int64)``: per row, the max and first argmax of the symmetric cosine over the columns
    ``j != i`` with ``col_key[j] > row_key[i]``, protected rows and columns excluded."""
    batch, n = metric.shape[0], metric.shape[1]
    best = torch.empty(batch, n, device=metric.device, dtype=torch.float32)
    arg = torch.empty(batch, n, device=metric.device, dtype=torch.int64)
    launch_crossget_rowmax(metric, inv, row_key, col_key, protected, best, arg)
    return best, arg


@crossget_rowmax.register_fake
def _(
    metric: torch.Tensor, inv: torch.Tensor, row_key: torch.Tensor, col_key: torch.Tensor, protected: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, n = metric.shape[0], metric.shape[1]
    return (metric.new_empty(batch, n, dtype=torch.float32), metric.new_empty(batch, n, dtype=torch.int64))
