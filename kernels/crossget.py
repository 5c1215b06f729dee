"""CrossGET's hot step: each token's best partner over the complete graph, without the ``N × N`` matrix.

One program per (image, tile of rows) streams the column tiles, recomputes the symmetric cosine of
each (row, column) pair and keeps the running maximum and its first column (ties: the lower index).
The ``N × N`` similarity never reaches memory. Which columns a row may pick is given by two integer
keys: column ``j`` is allowed for row ``i`` when ``col_key[j] > row_key[i]`` (and ``j != i``, neither
of them protected). CrossGET uses it three times:

- every column (``row_key = -1``, ``col_key = 0``): each token's best similarity;
- the columns ranked after the row (``row_key = col_key = rank``): the adjusted similarity;
- the non-source columns (``row_key = 0``, ``col_key = 1`` for a non-source): the destination.

The cosine is the PyTorch op's formula with the same roundings: ``s_ij = (a_i · a_j) · inv_i · inv_j``
(in that order) with the inverse norms given, and the symmetric value ``(s_ij + s_ji) / 2`` written as
``s_ij · ½ + s_ji · ½`` (the same number, as halving is exact, and one that a fused multiply-add
cannot change). The dot products are fp32 (IEEE, no TF32); their summation order is Triton's.
A row with no allowed column gets ``-inf`` and index 0 (as ``torch.max`` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import padded


def _crossget_rowmax_cost(grid, metadata, args):
    metric = args["metric_ptr"]
    batch, n, d = metric.shape
    bm, bn, bd = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_D"]
    pm, pn, pd = padded(n, bm), padded(n, bn), padded(d, bd)
    es = metric.element_size()
    flops = batch * pm * pn * (2 * pd + 14)  # dot, two scalings, symmetrization, mask, running max
    moved = batch * (n * d * es + n * (4 + 8 + 8) + n * 12)
    loads = batch * (n * d * es + grid[1] * n * (d * es + 4 + 8) + n * 24)
    return {"flops": flops, "bytes": moved, "loads": loads}


@triton.jit(launch_metadata=_crossget_rowmax_cost)
def _crossget_rowmax_kernel(
    metric_ptr, inv_ptr, row_key_ptr, col_key_ptr, best_ptr, arg_ptr,
    N, D, protected,
    stride_mb, stride_mn, stride_md, stride_ib, stride_in,
    stride_rb, stride_rn, stride_cb, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    img, tile = tl.program_id(0), tl.program_id(1)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    metric = metric_ptr + img * stride_mb
    inv_i = tl.load(inv_ptr + img * stride_ib + offs_m * stride_in, mask=mmask, other=0.0)
    row_key = tl.load(row_key_ptr + img * stride_rb + offs_m * stride_rn, mask=mmask, other=0)
    row_ok = mmask & (offs_m >= protected)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_M], tl.int32)
    for j0 in range(0, N, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            dmask = dd < D
            a = tl.load(metric + offs_m[:, None] * stride_mn + dd[None, :] * stride_md,
                        mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            b = tl.load(metric + offs_n[:, None] * stride_mn + dd[None, :] * stride_md,
                        mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            dots += tl.dot(a, tl.trans(b), input_precision="ieee")
        inv_j = tl.load(inv_ptr + img * stride_ib + offs_n * stride_in, mask=nmask, other=0.0)
        col_key = tl.load(col_key_ptr + img * stride_cb + offs_n * stride_cn, mask=nmask, other=0)
        s_ij = dots * inv_i[:, None] * inv_j[None, :]  # the op's sim[i, j]
        s_ji = dots * inv_j[None, :] * inv_i[:, None]  # the op's sim[j, i]
        sym = s_ij * 0.5 + s_ji * 0.5
        allowed = (row_ok[:, None] & nmask[None, :] & (offs_n >= protected)[None, :]
                   & (offs_n[None, :] != offs_m[:, None]) & (col_key[None, :] > row_key[:, None]))
        sym = tl.where(allowed, sym, float("-inf"))
        tile_best = tl.max(sym, axis=1)
        tile_arg = tl.argmax(sym, axis=1, tie_break_left=True).to(tl.int32) + j0
        better = tile_best > best  # strict: an earlier tile (lower column) keeps a tie
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg, arg)
    tl.store(best_ptr + img * N + offs_m, best, mask=mmask)
    tl.store(arg_ptr + img * N + offs_m, arg.to(tl.int64), mask=mmask)


def launch_crossget_rowmax(
    metric: torch.Tensor, inv: torch.Tensor, row_key: torch.Tensor, col_key: torch.Tensor,
    protected: int, best: torch.Tensor, arg: torch.Tensor, block: int = 32,
) -> None:
    """Fill ``best [B, N]`` (fp32, contiguous) and ``arg [B, N]`` (int64, contiguous) with each row's
    maximum and first argmax of the symmetric cosine over its allowed columns.

    ``metric [B, N, d]`` (fp32 or fp16, any strides), ``inv [B, N]`` fp32 its inverse row norms,
    ``row_key, col_key [B, N]`` integers: column ``j`` is allowed for row ``i`` when
    ``col_key[j] > row_key[i]``, ``j != i`` and both are ``>= protected``.
    """
    batch, n, d = metric.shape
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    wrap_triton(_crossget_rowmax_kernel)[(batch, triton.cdiv(n, block))](
        metric, inv, row_key, col_key, best, arg,
        n, d, protected,
        metric.stride(0), metric.stride(1), metric.stride(2), inv.stride(0), inv.stride(1),
        row_key.stride(0), row_key.stride(1), col_key.stride(0), col_key.stride(1),
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d,
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
