"""ToMe's bipartite matching as Triton launches: keys in, destination map out.

The keys (``[B, H, N, d]``; ``H = 1`` for a ready metric) are summed over heads into fp32 rows with
their inverse norms: the cosine is scale-invariant, so the sum stands for ToMe's head mean. Each A
token (even position) takes its best B partner (odd position) by cosine, computed as
``(a · b) · (1/‖a‖) · (1/‖b‖)`` in fp32 (IEEE dot, correctly rounded square root and division: the
matches are discrete decisions, the same formula as the plain-PyTorch op); ties go to the lowest B
index. The ``r`` A tokens with the highest best score (ties: the lowest A index) become sources, and
every token's output slot is written in ToMe's order. The ``⌈N/2⌉ × ⌊N/2⌋`` score matrix never
reaches memory.

Two plans, chosen by the launcher (:func:`plan_tome`):

- **spread** (few images: one program per image would leave nearly every SM idle), three launches.
  ``_head_sum_kernel``: a program per tile of tokens writes the fp32 head sums and inverse norms to
  a scratch (one kernel for ToMe and PiToMe). ``_tome_best_kernel``: a program per (tile of A
  tokens, chunk of B tokens) streams the chunk's B tiles past its A tile and writes the chunk's best
  score and partner. ``_tome_slots_kernel``: a program per image combines the chunks in increasing
  order (a later chunk wins only when strictly better: the first maximum, the lowest B index),
  finds the sources as the top ``r`` of the best scores by a radix selection (:func:`top_r`: the
  ``r``-th largest score bit by bit, ties by index, exactly ``rank < r`` of a stable descending
  sort) and writes every slot (a prefix count of the kept A tokens).
- **per image** (many images: every SM already has images), ``_tome_match_kernel``: one program
  per image does all of it in phases separated by barriers, so the head sums' memory traffic
  overlaps the score arithmetic. The B rows go through the scratch; each A tile is head-summed
  where it is used.

Both plans are deterministic (no atomics, every reduction in a fixed order) and run the same jit
helpers for the scores and the slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import H200, TINY, cdiv, padded

# Programs that keep every SM of an H100/H200 (132) busy for about two waves: the spread plan sizes
# its tiles so that a launch has at least this many programs where the image allows it.
TARGET_PROGRAMS = 2 * H200.sms
# The head sum streams the keys: this many programs pull them near the memory's rate.
HEAD_SUM_PROGRAMS = 24
# From this many images on, one program per image: the SMs are busy already, and one program that
# does every phase overlaps the head sum's memory traffic with the score arithmetic (the model in
# bench/kernel_model.py puts the crossover between 48 and 96 images at DeiT-S to ViT-L shapes).
PER_IMAGE_FROM = 64
# The top-r selection's cost per lane: 32 bit passes of (compare, and, sum) and the tie pass.
SELECT_OPS = 32 * 3 + 12


# ---------------------------------------------------------------------------------------------
# jit helpers (shared by both plans and by PiToMe)


@triton.jit
def head_sum_rows(keys, rows, rmask, H, stride_kh, stride_kn, stride_kd, D,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token rows ``rows`` of one image: (keys summed over heads in fp32, in head order,
    ``[BLOCK_R, BLOCK_D]``; 1/‖row‖, floored at TINY, correctly rounded)."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for h in range(0, H):
        acc += tl.load(
            keys + h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
    norm = tl.sqrt_rn(tl.sum(acc * acc, axis=1))
    inv = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.maximum(norm, TINY))
    return acc, inv


@triton.jit
def keep_best(best, partner, scores, b0):
    """The running (best, partner) of each row after one tile of ``scores`` whose first column is
    ``b0``: the tile's first maximum, taken only when strictly better (an earlier tile, a lower
    index, keeps a tie)."""
    tile_best, tile_arg = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, tile_arg.to(tl.int32) + b0, partner)


@triton.jit
def stream_best(a, inv_a, a_ok, metric, inv, j_start, j_end, b_step, b_off, prot_b,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Best cosine of each row of ``a`` over the B tokens ``j_start <= j < j_end`` (scratch rows
    ``b_step * j + b_off``; B tokens below ``prot_b`` and rows where ``a_ok`` is false score -inf)
    and its partner, the lowest such ``j`` (``j_start`` when every score is -inf)."""
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    partner = tl.zeros([BLOCK_A], tl.int32) + j_start
    for b0 in range(j_start, j_end, BLOCK_B):
        jb = b0 + tl.arange(0, BLOCK_B)
        bmask = jb < j_end
        row = b_step * jb + b_off
        bt = tl.load(metric + row[:, None] * BLOCK_D + offs_d[None, :], mask=bmask[:, None], other=0.0)
        inv_b = tl.load(inv + row, mask=bmask, other=0.0)
        dots = tl.dot(a, tl.trans(bt), input_precision="ieee")
        scores = dots * inv_a[:, None] * inv_b[None, :]
        allowed = a_ok[:, None] & (jb >= prot_b)[None, :] & bmask[None, :]
        best, partner = keep_best(best, partner, tl.where(allowed, scores, float("-inf")), b0)
    return best, partner


@triton.jit
def combine_chunks(best_row, partner_row, idx, mask, n_chunks, chunk_stride):
    """The best of ``n_chunks`` partial (best, partner) rows, in increasing chunk order; a later
    chunk wins only when strictly better, so a tie keeps the lowest partner."""
    best = tl.load(best_row + idx, mask=mask, other=float("-inf"))
    partner = tl.load(partner_row + idx, mask=mask, other=0)
    for c in range(1, n_chunks):
        b = tl.load(best_row + c * chunk_stride + idx, mask=mask, other=float("-inf"))
        p = tl.load(partner_row + c * chunk_stride + idx, mask=mask, other=0)
        better = b > best
        best = tl.where(better, b, best)
        partner = tl.where(better, p, partner)
    return best, partner


@triton.jit
def top_r(score, valid, r):
    """``rank < r`` for every lane, ``rank`` being the place in a stable descending sort of the
    valid lanes (ties to the lower lane), without the pairwise ranks: the ``r``-th largest score is
    found bit by bit (a radix selection on the order-preserving integer image of fp32, -0 taken as
    +0 so that equal scores stay equal), then the tied lanes are taken by lane order."""
    s = tl.where(score == 0.0, 0.0, score)
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order == float order
    # Greedy from the top bit, in the unsigned image u = key + 2^31: the largest u* with
    # count(u >= u*) >= r is the r-th largest key.
    prefix = tl.zeros([], tl.int64)
    step = tl.full([], 2147483648, tl.int64)
    for _ in range(32):
        cand = prefix + step
        thr = (cand - 2147483648).to(tl.int32)
        count = tl.sum(((key >= thr) & valid).to(tl.int32), axis=0)
        prefix = tl.where(count >= r, cand, prefix)
        step = step // 2
    kth = (prefix - 2147483648).to(tl.int32)
    above = (key > kth) & valid
    tied = (key == kth) & valid
    need = r - tl.sum(above.to(tl.int32), axis=0)
    tied_before = tl.cumsum(tied.to(tl.int32), axis=0) - tied.to(tl.int32)
    return above | (tied & (tied_before < need))


@triton.jit
def tome_slots(best_row, partner_row, n_chunks, chunk_stride, dest, N, r, protected, stride_dn,
               DROP: tl.constexpr, BLOCK_ALL: tl.constexpr):
    """Every slot of one image from its A tokens' partial best scores and partners."""
    n_a = (N + 1) // 2
    n_b = N // 2
    prot_a = (protected + 1) // 2
    prot_b = protected // 2
    ia = tl.arange(0, BLOCK_ALL)
    amask = ia < n_a
    best, partner = combine_chunks(best_row, partner_row, ia, amask, n_chunks, chunk_stride)
    is_src = top_r(best, amask, r)
    is_prot = ia < prot_a
    kept = (~is_src) & (~is_prot) & amask
    kept_rank = tl.cumsum(kept.to(tl.int32), axis=0)
    n_kept_a = n_a - prot_a - r
    partner_slot = tl.where(partner < prot_b, 2 * partner + 1, protected + n_kept_a + partner - prot_b)
    if DROP:  # ToFu's pruning: sources leave instead of merging
        partner_slot = tl.full([BLOCK_ALL], -1, tl.int32)
    slot = tl.where(is_prot, 2 * ia, tl.where(is_src, partner_slot, protected - 1 + kept_rank))
    tl.store(dest + (2 * ia) * stride_dn, slot.to(tl.int64), mask=amask)
    slot_b = tl.where(ia < prot_b, 2 * ia + 1, protected + n_kept_a + ia - prot_b)
    tl.store(dest + (2 * ia + 1) * stride_dn, slot_b.to(tl.int64), mask=ia < n_b)


# ---------------------------------------------------------------------------------------------
# the head sum (spread plans of ToMe and PiToMe)


def _head_sum_cost(grid, metadata, args):
    keys = args["keys_ptr"]
    batch, n, heads, d, bd, bt = grid[0], args["n_rows"], args["H"], args["D"], args["BLOCK_D"], args["BLOCK_T"]
    rows = padded(n, bt)
    flops = rows * (heads * bd + 3 * bd + 4)  # head adds, squares and their sum, sqrt, max, divide
    moved = n * heads * d * keys.element_size() + n * (bd + 1) * 4  # keys once, rows and norms out
    return {"flops": batch * flops, "bytes": batch * moved, "loads": batch * moved}


@triton.jit(launch_metadata=_head_sum_cost)
def _head_sum_kernel(keys_ptr, metric_ptr, inv_ptr, n_rows, first, H, D,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tokens ``first .. first + n_rows`` of image ``program_id(0)``, a tile of ``BLOCK_T`` per
    ``program_id(1)``: ``metric[img, t]`` (fp32, row stride BLOCK_D, zero-padded) and ``inv``."""
    img = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < n_rows
    keys = keys_ptr + img * stride_kb + first * stride_kn
    acc, inv = head_sum_rows(keys, t, tmask, H, stride_kh, stride_kn, stride_kd, D, BLOCK_T, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    rows = img * n_rows + t
    tl.store(metric_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], acc, mask=tmask[:, None])
    tl.store(inv_ptr + rows, inv, mask=tmask)


def rows_per_program(batch: int, n: int) -> int:
    """Head-sum tile: a power of two in [4, 32], about HEAD_SUM_PROGRAMS programs in all (enough
    SMs to stream the keys near the memory's rate; fewer, longer programs past that)."""
    block = 4
    while block < 32 and batch * n >= 2 * block * HEAD_SUM_PROGRAMS:
        block *= 2
    return block


def launch_head_sum(keys: torch.Tensor, first: int, n_rows: int, block_d: int, wrap) -> tuple:
    """fp32 head sums ``[B, n_rows, block_d]`` and inverse norms ``[B, n_rows]`` of tokens
    ``first .. first + n_rows`` of ``keys [B, H, N, d]``, launched through ``wrap``
    (the calling module's ``wrap_triton``, which tomec.kernels.aot records)."""
    batch, heads, _, d = keys.shape
    metric = torch.empty(batch, n_rows, block_d, device=keys.device, dtype=torch.float32)
    inv = torch.empty(batch, n_rows, device=keys.device, dtype=torch.float32)
    block_t = rows_per_program(batch, n_rows)
    wrap(_head_sum_kernel)[(batch, max(1, cdiv(n_rows, block_t)))](
        keys, metric, inv, n_rows, first, heads, d,
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return metric, inv


def chunking(n_b: int, block_b: int, other_programs: int) -> tuple[int, int]:
    """(B tokens per chunk, chunks): whole tiles of ``block_b``, as many chunks as it takes for
    ``other_programs`` (images × A tiles) to reach TARGET_PROGRAMS."""
    tiles = max(1, cdiv(n_b, block_b))
    want = min(tiles, max(1, cdiv(TARGET_PROGRAMS, other_programs)))
    chunk = block_b * cdiv(tiles, want)
    return chunk, max(1, cdiv(n_b, chunk))


def chunk_columns(n: int, chunk: int, n_chunks: int, block: int) -> int:
    """Columns a chunked loop really computes: whole tiles of ``block`` in every chunk."""
    last = n - (n_chunks - 1) * chunk
    return (n_chunks - 1) * chunk + padded(max(last, 0), block)


def select_block(n: int) -> tuple[int, int]:
    """(lanes, warps) of a program that holds all ``n`` A tokens of an image at once."""
    block = max(16, triton.next_power_of_2(max(n, 1)))
    return block, 4 if block <= 512 else 8 if block <= 1024 else 16


# ---------------------------------------------------------------------------------------------
# ToMe, spread plan


class TomePlan(NamedTuple):
    per_image: bool
    block_a: int = 32  # A tokens per tile
    block_b: int = 32  # B tokens per tile
    chunk_b: int = 0  # B tokens per chunk of the spread plan (a multiple of block_b)


def plan_tome(batch: int, n: int) -> TomePlan:
    """The launch plan for ``batch`` images of ``n`` tokens (see the module docstring)."""
    n_a, n_b = (n + 1) // 2, n // 2
    if batch >= PER_IMAGE_FROM or n_a <= 16:
        return TomePlan(True, 32, 32)
    block_a = 16 if batch * cdiv(n_a, 32) < TARGET_PROGRAMS else 32
    chunk, _ = chunking(n_b, 32, batch * cdiv(n_a, block_a))
    return TomePlan(False, block_a, 32, chunk)


def _tome_best_cost(grid, metadata, args):
    batch, a_tiles, n_chunks = grid
    n, bd, ba, bb, chunk = args["N"], args["BLOCK_D"], args["BLOCK_A"], args["BLOCK_B"], args["chunk"]
    n_a, n_b = (n + 1) // 2, n // 2
    cols = chunk_columns(n_b, chunk, n_chunks, bb)
    flops = a_tiles * ba * cols * (2 * bd + 8)  # dot, scale, mask, running max and argmax
    row = bd * 4 + 4  # a scratch row and its inverse norm
    partial = n_chunks * n_a * 8
    moved = n * row + partial
    loads = n_chunks * n_a * row + a_tiles * n_b * row + partial  # B rows re-read per A tile
    return {"flops": batch * flops, "bytes": batch * moved, "loads": batch * loads}


@triton.jit(launch_metadata=_tome_best_cost)
def _tome_best_kernel(metric_ptr, inv_ptr, best_ptr, partner_ptr, N, protected, chunk, n_chunks,
                      BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (image, A tile, B chunk): the chunk's best score and partner of every A token."""
    img = tl.program_id(0).to(tl.int64)
    c = tl.program_id(2)
    n_a = (N + 1) // 2
    n_b = N // 2
    prot_a = (protected + 1) // 2
    offs_d = tl.arange(0, BLOCK_D)
    metric = metric_ptr + img * N * BLOCK_D
    inv = inv_ptr + img * N
    ia = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    amask = ia < n_a
    a = tl.load(metric + (2 * ia)[:, None] * BLOCK_D + offs_d[None, :], mask=amask[:, None], other=0.0)
    inv_a = tl.load(inv + 2 * ia, mask=amask, other=0.0)
    j_start = c * chunk
    j_end = tl.minimum(j_start + chunk, n_b)
    best, partner = stream_best(a, inv_a, ia >= prot_a, metric, inv, j_start, j_end, 2, 1,
                                protected // 2, BLOCK_A, BLOCK_B, BLOCK_D)
    out = (img * n_chunks + c) * n_a + ia
    tl.store(best_ptr + out, best, mask=amask)
    tl.store(partner_ptr + out, partner, mask=amask)


def _tome_slots_cost(grid, metadata, args):
    batch, n, n_chunks, block = grid[0], args["N"], args["n_chunks"], args["BLOCK_ALL"]
    n_a = (n + 1) // 2
    flops = block * (3 * (n_chunks - 1) + SELECT_OPS + 24)  # combine, select, slots of A and B
    moved = n_chunks * n_a * 8 + n * 8
    return {"flops": batch * flops, "bytes": batch * moved, "loads": batch * moved}


@triton.jit(launch_metadata=_tome_slots_cost)
def _tome_slots_kernel(best_ptr, partner_ptr, dest_ptr, N, r, protected, n_chunks, stride_db, stride_dn,
                       DROP: tl.constexpr, BLOCK_ALL: tl.constexpr):
    """One program per image: sources and every slot from the chunks' partial best scores."""
    img = tl.program_id(0).to(tl.int64)
    n_a = (N + 1) // 2
    base = img * n_chunks * n_a
    tome_slots(best_ptr + base, partner_ptr + base, n_chunks, n_a, dest_ptr + img * stride_db,
               N, r, protected, stride_dn, DROP, BLOCK_ALL)


# ---------------------------------------------------------------------------------------------
# ToMe, per-image plan


def _tome_match_cost(grid, metadata, args):
    keys = args["keys_ptr"]
    batch, n, heads, d, bd = grid[0], args["N"], args["H"], args["D"], args["BLOCK_D"]
    ba, bb = args["BLOCK_A"], args["BLOCK_B"]
    n_a, n_b = (n + 1) // 2, n // 2
    pa, pb = padded(n_a, ba), padded(n_b, bb)
    head_sum = (pa + pb) * (heads * bd + 3 * bd + 4)
    best = pa * pb * (2 * bd + 8)  # dot, scale, mask, running max and argmax
    key_bytes = n * heads * d * keys.element_size()
    row = bd * 4 + 4  # a B row and its inverse norm in the scratch
    moved = key_bytes + 2 * n_b * row + n_a * 8  # keys, B rows out and back, best/partner out
    loads = key_bytes + n_b * row + (pa // ba) * n_b * row + n_a * 8
    return {"flops": batch * (head_sum + best), "bytes": batch * moved, "loads": batch * loads}


@triton.jit(launch_metadata=_tome_match_cost)
def _tome_match_kernel(
    keys_ptr, metric_ptr, inv_ptr, best_ptr, partner_ptr, N, H, D, protected,
    stride_kb, stride_kh, stride_kn, stride_kd,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per image (the per-image plan): the head sums and every A token's best score
    and partner, for :func:`_tome_slots_kernel`."""
    img = tl.program_id(0).to(tl.int64)
    n_a = (N + 1) // 2
    n_b = N // 2
    prot_a = (protected + 1) // 2
    offs_d = tl.arange(0, BLOCK_D)
    keys = keys_ptr + img * stride_kb
    metric = metric_ptr + img * n_b * BLOCK_D
    inv = inv_ptr + img * n_b
    best_row = best_ptr + img * n_a
    partner_row = partner_ptr + img * n_a

    # Phase 0: the B rows (odd positions) summed over heads, with their inverse norms.
    for b0 in range(0, n_b, BLOCK_B):
        jb = b0 + tl.arange(0, BLOCK_B)
        bmask = jb < n_b
        acc, inv_b = head_sum_rows(keys, 2 * jb + 1, bmask, H, stride_kh, stride_kn, stride_kd, D,
                                   BLOCK_B, BLOCK_D)
        tl.store(metric + jb[:, None] * BLOCK_D + offs_d[None, :], acc, mask=bmask[:, None])
        tl.store(inv + jb, inv_b, mask=bmask)
    tl.debug_barrier()

    # Phase 1: each A tile summed where it is used, its best partner streamed over the B tiles.
    for a0 in range(0, n_a, BLOCK_A):
        ia = a0 + tl.arange(0, BLOCK_A)
        amask = ia < n_a
        a, inv_a = head_sum_rows(keys, 2 * ia, amask, H, stride_kh, stride_kn, stride_kd, D,
                                 BLOCK_A, BLOCK_D)
        best, partner = stream_best(a, inv_a, ia >= prot_a, metric, inv, 0, n_b, 1, 0, protected // 2,
                                    BLOCK_A, BLOCK_B, BLOCK_D)
        tl.store(best_row + ia, best, mask=amask)
        tl.store(partner_row + ia, partner, mask=amask)


def launch_tome_match(
    keys: torch.Tensor, r: int, protected: int, dest: torch.Tensor, drop_sources: bool = False
) -> None:
    """Fill ``dest [B, N]`` (int64) with ToMe's destination map.

    ``keys``: ``[B, H, N, d]`` (summed over heads here) or a metric ``[B, N, d]``;
    ``drop_sources``: the sources get ``-1`` (ToFu's pruning).
    """
    if keys.dim() == 3:
        keys = keys.unsqueeze(1)
    run_tome_match(keys, r, protected, dest, drop_sources, plan_tome(keys.shape[0], keys.shape[2]))


def run_tome_match(keys: torch.Tensor, r: int, protected: int, dest: torch.Tensor, drop_sources: bool,
                   plan: TomePlan) -> None:
    """:func:`launch_tome_match` with an explicit plan (``keys`` ``[B, H, N, d]``; tests pick
    small tiles here to cross tile and chunk boundaries at small N)."""
    batch, heads, n, d = keys.shape
    n_a, n_b = (n + 1) // 2, n // 2
    block_d = max(16, triton.next_power_of_2(d))
    block_all, warps = select_block(n_a)
    f32 = dict(device=keys.device, dtype=torch.float32)
    i32 = dict(device=keys.device, dtype=torch.int32)
    if plan.per_image:
        n_chunks = 1
        metric = torch.empty(batch, n_b, block_d, **f32)
        inv = torch.empty(batch, n_b, **f32)
        best = torch.empty(batch, n_a, **f32)
        partner = torch.empty(batch, n_a, **i32)
        wrap_triton(_tome_match_kernel)[(batch,)](
            keys, metric, inv, best, partner, n, heads, d, protected,
            keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
            BLOCK_A=plan.block_a, BLOCK_B=plan.block_b, BLOCK_D=block_d,
            num_warps=8,  # at 4, ptxas spills on sm_80 (DTEM's one-head metric) and sm_100
        )
    else:
        metric, inv = launch_head_sum(keys, 0, n, block_d, wrap_triton)
        chunk = plan.chunk_b
        n_chunks = max(1, cdiv(n_b, chunk))
        best = torch.empty(batch, n_chunks, n_a, **f32)
        partner = torch.empty(batch, n_chunks, n_a, **i32)
        wrap_triton(_tome_best_kernel)[(batch, cdiv(n_a, plan.block_a), n_chunks)](
            metric, inv, best, partner, n, protected, chunk, n_chunks,
            BLOCK_A=plan.block_a, BLOCK_B=plan.block_b, BLOCK_D=block_d,
            num_warps=2 if plan.block_a <= 16 else 4,  # fewer registers at every head width
        )
    wrap_triton(_tome_slots_kernel)[(batch,)](
        best, partner, dest, n, r, protected, n_chunks, dest.stride(0), dest.stride(1),
        DROP=drop_sources, BLOCK_ALL=block_all, num_warps=warps,
    )


@triton_op("tomec::bipartite_match", mutates_args=())
def bipartite_match(keys: torch.Tensor, r: int, protected: int, drop_sources: bool = False) -> torch.Tensor:
    """``[B, H, N, d]`` keys (or a ``[B, N, d]`` metric) ``-> dest [B, N]`` int64: ToMe's bipartite
    matching (see :func:`tomec.ops.bipartite_match`)."""
    dest = torch.empty(keys.shape[0], keys.shape[-2], device=keys.device, dtype=torch.int64)
    launch_tome_match(keys, r, protected, dest, drop_sources)
    return dest


@bipartite_match.register_fake
def _(keys: torch.Tensor, r: int, protected: int, drop_sources: bool = False) -> torch.Tensor:
    return keys.new_empty(keys.shape[0], keys.shape[-2], dtype=torch.int64)
