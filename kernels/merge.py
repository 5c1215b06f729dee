"""The destination-map merge as Triton kernels: deterministic, no atomics, no host synchronization.

``_dest_csr_kernel`` (one program per image) sorts the tokens by ``(slot, position)`` into a
permutation and the start of every slot's run (a counting sort in CSR form); dropped tokens
(``dest == -1``) sort last and are never read. ``_merge_kernel`` then *pulls*: each program owns a
tile of output slots × channels and sums the members of each slot in increasing position, so every
token is read once, every output written once, and the sum order never changes between runs.
Optional epilogue: ToFu's norm-preserving merge (mean direction, largest member norm).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import TINY, log2_ceil

# The merge epilogues by name (tomec.ops.merge's ``mode``), as the kernel's constexpr.
MEAN, NORM_PRESERVING = 0, 1
MODES = {"mean": MEAN, "norm_preserving": NORM_PRESERVING}


def _csr_cost(grid, metadata, args):
    batch, n, block = grid[0], args["N"], args["BLOCK_N"]
    stages = log2_ceil(block) * (log2_ceil(block) + 1) // 2  # bitonic sort
    moved = batch * (n * (8 + 4 + 8) + (args["n_out"] + 1) * 4)  # dest twice, perm, starts
    return {"flops": batch * block * stages * 2, "bytes": moved, "loads": moved}


@triton.jit(launch_metadata=_csr_cost)
def _dest_csr_kernel(
    dest_ptr,
    perm_ptr,
    starts_ptr,
    N,
    n_out,
    stride_db,
    stride_dn,
    BLOCK_N: tl.constexpr,
):
    img = tl.program_id(0)
    i = tl.arange(0, BLOCK_N)
    dest = tl.load(dest_ptr + img * stride_db + i * stride_dn, mask=i < N, other=-1).to(tl.int32)
    valid = (dest >= 0) & (i < N)
    big = n_out * BLOCK_N + BLOCK_N
    keys = tl.sort(tl.where(valid, dest * BLOCK_N + i, big))
    kept = keys < big
    member = keys % BLOCK_N
    perm = perm_ptr + img * N
    tl.store(perm + i, member, mask=i < N)
    tl.debug_barrier()
    # A run of equal slots starts where the previous sorted member belongs to another slot.
    slot = keys // BLOCK_N
    prev_member = tl.load(perm + i - 1, mask=(i > 0) & kept, other=0)
    prev_slot = tl.load(dest_ptr + img * stride_db + prev_member * stride_dn, mask=(i > 0) & kept, other=-1)
    first = kept & ((i == 0) | (prev_slot != slot))
    starts = starts_ptr + img * (n_out + 1)
    tl.store(starts + slot, i, mask=first)
    n_kept = tl.sum(kept.to(tl.int32), axis=0)
    tl.store(starts + n_out, n_kept)


def _merge_cost(grid, metadata, args):
    x, out = args["x_ptr"], args["out_ptr"]
    batch, n, channels = x.shape
    n_out = out.shape[1]
    per_token = 2 + 2 * (args["MODE"] == 1)  # weighted add (+ the norm)
    side = 4 * args["HAS_SIZE"] + 4 * args["HAS_W"]
    moved = batch * ((n * channels + n_out * channels) * x.element_size() + n * (4 + side) + n_out * 8)
    col_tiles = grid[2]
    loads = moved + batch * n * (4 + side) * (col_tiles - 1)  # perm and sizes re-read per channel tile
    return {"flops": batch * n * channels * per_token, "bytes": moved, "loads": loads}


@triton.jit(launch_metadata=_merge_cost)
def _merge_kernel(
    x_ptr,
    size_ptr,
    w_ptr,
    perm_ptr,
    starts_ptr,
    out_ptr,
    size_out_ptr,
    N,
    C,
    n_out,
    stride_xb,
    stride_xn,
    stride_xc,
    stride_sb,
    stride_sn,
    stride_wb,
    stride_wn,
    stride_ob,
    stride_on,
    stride_oc,
    HAS_SIZE: tl.constexpr,
    HAS_W: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    img = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    smask = s < n_out
    cmask = c < C
    starts = starts_ptr + img * (n_out + 1)
    first = tl.load(starts + s, mask=smask, other=0)
    count = tl.load(starts + s + 1, mask=smask, other=0) - first
    count = tl.where(smask, count, 0)
    longest = tl.max(count, axis=0)
    # fp32 sums for 16- and 32-bit tokens; fp64 tokens keep fp64 (as the PyTorch op)
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    weight = tl.zeros([BLOCK_S], ACC)
    total = tl.zeros([BLOCK_S], ACC)
    largest = tl.zeros([BLOCK_S], ACC)
    for k in range(0, longest):
        live = k < count
        tok = tl.load(perm_ptr + img * N + first + k, mask=live, other=0)
        xk = tl.load(
            x_ptr + img * stride_xb + tok[:, None] * stride_xn + c[None, :] * stride_xc,
            mask=live[:, None] & cmask[None, :],
            other=0.0,
        ).to(ACC)
        if HAS_SIZE:
            sk = tl.load(size_ptr + img * stride_sb + tok * stride_sn, mask=live, other=0.0).to(ACC)
        else:
            sk = tl.where(live, 1.0, 0.0).to(ACC)
        if HAS_W:
            wk = tl.load(w_ptr + img * stride_wb + tok * stride_wn, mask=live, other=0.0).to(ACC)
        else:
            wk = sk
        acc += wk[:, None] * xk
        weight += wk
        total += sk
        if MODE == 1:
            largest = tl.maximum(largest, tl.sqrt(tl.sum(xk * xk, axis=1)))
    mean = acc / tl.where(smask, weight, 1.0)[:, None]
    if MODE == 1:
        norm = tl.sqrt(tl.sum(mean * mean, axis=1))
        mean = mean * (largest / tl.maximum(norm, TINY))[:, None]
    tl.store(
        out_ptr + img * stride_ob + s[:, None] * stride_on + c[None, :] * stride_oc,
        mean.to(out_ptr.dtype.element_ty),
        mask=smask[:, None] & cmask[None, :],
    )
    if tl.program_id(2) == 0:
        tl.store(size_out_ptr + img * n_out + s, total.to(size_out_ptr.dtype.element_ty), mask=smask)


def _compose_cost(grid, metadata, args):
    moved = args["source_ptr"].numel() * 8 * 3  # source, one dest entry per token, out
    return {"flops": 0, "bytes": moved, "loads": moved}


@triton.jit(launch_metadata=_compose_cost)
def _compose_source_kernel(
    source_ptr, dest_ptr, out_ptr, N0, N, stride_sb, stride_db, stride_dn, BLOCK: tl.constexpr
):
    img = tl.program_id(0)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    omask = o < N0
    src = tl.load(source_ptr + img * stride_sb + o, mask=omask, other=-1)
    live = omask & (src >= 0)
    slot = tl.load(dest_ptr + img * stride_db + src * stride_dn, mask=live, other=-1)
    tl.store(out_ptr + img * N0 + o, tl.where(live, slot, -1), mask=omask)


def launch_merge(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    dest: torch.Tensor,
    w: Optional[torch.Tensor],
    out: torch.Tensor,
    size_out: torch.Tensor,
    mode: int = MEAN,
) -> None:
    """Fill ``out [B, n_out, C]`` and ``size_out [B, n_out, 1]`` (contiguous) from ``x [B, N, C]``."""
    batch, n, channels = x.shape
    n_out = out.shape[1]
    perm = torch.empty(batch, n, device=x.device, dtype=torch.int32)
    starts = torch.empty(batch, n_out + 1, device=x.device, dtype=torch.int32)
    block_n = max(16, triton.next_power_of_2(n))
    wrap_triton(_dest_csr_kernel)[(batch,)](
        dest, perm, starts, n, n_out, dest.stride(0), dest.stride(1), BLOCK_N=block_n
    )
    if mode == NORM_PRESERVING:  # the norms need whole rows: one channel tile
        block_c, block_s = max(16, triton.next_power_of_2(channels)), 4
    else:
        block_c, block_s = min(128, max(16, triton.next_power_of_2(channels))), 16
    if x.dtype == torch.float64:  # fp64 accumulators: half the slots per program keeps the registers
        block_s = max(block_s // 2, 1)
    size_strides = (size.stride(0), size.stride(1)) if size is not None else (0, 0)
    w_strides = (w.stride(0), w.stride(1)) if w is not None else (0, 0)
    grid = (batch, triton.cdiv(n_out, block_s), triton.cdiv(channels, block_c))
    # absent operands: any tensor as a placeholder pointer, never read (HAS_SIZE / HAS_W are off)
    wrap_triton(_merge_kernel)[grid](
        x, x if size is None else size, x if w is None else w, perm, starts, out, size_out,
        n, channels, n_out,
        x.stride(0), x.stride(1), x.stride(2),
        *size_strides, *w_strides,
        out.stride(0), out.stride(1), out.stride(2),
        HAS_SIZE=size is not None, HAS_W=w is not None, MODE=mode,
        BLOCK_S=block_s, BLOCK_C=block_c,
    )


@triton_op("tomec::merge", mutates_args=())
def merge(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    dest: torch.Tensor,
    n_out: int,
    w: Optional[torch.Tensor],
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a destination map (see :func:`tomec.ops.merge`); ``mode``: a key of :data:`MODES`."""
    batch, _, channels = x.shape
    out = torch.empty(batch, n_out, channels, device=x.device, dtype=x.dtype)
    size_out = torch.empty(batch, n_out, 1, device=x.device, dtype=x.dtype)
    launch_merge(x, size, dest, w, out, size_out, MODES[mode])
    return out, size_out


@merge.register_fake
def _(x, size, dest, n_out, w, mode):
    batch, _, channels = x.shape
    return x.new_empty(batch, n_out, channels), x.new_empty(batch, n_out, 1)


def launch_compose_source(source: torch.Tensor, dest: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out [B, N0]`` with ``dest[b, source[b, o]]`` (``-1`` stays ``-1``)."""
    batch, n0 = source.shape
    block = 128
    wrap_triton(_compose_source_kernel)[(batch, triton.cdiv(n0, block))](
        source, dest, out, n0, dest.shape[1], source.stride(0), dest.stride(0), dest.stride(1),
        BLOCK=block,
    )


@triton_op("tomec::compose_source", mutates_args=())
def compose_source(source: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """``[B, N0]``: the slot each original token ends in after this merge."""
    out = torch.empty_like(source, memory_format=torch.contiguous_format)
    launch_compose_source(source, dest, out)
    return out


@compose_source.register_fake
def _(source, dest):
    return torch.empty_like(source, memory_format=torch.contiguous_format)
