"""The attention each token receives (MCTF and LTMP), from q and k, without storing the ``N × N`` attention map.

Three launches, no atomics, every sum in a fixed order (the same bits on every run):

1. ``_row_lse_kernel``, one program per (image, head, query tile, key chunk): the query tile stays in
   registers while the chunk's key tiles stream past it with an online max and sum; it stores the
   chunk's log-sum-exp of each query row (``[B, H, S, N]``, fp32 scratch).
2. ``_column_mean_kernel``, one program per (image, head, key tile, query chunk): the key tile stays
   in registers while the chunk's query tiles stream past it; each query row's log-sum-exp is
   combined from its ``S`` chunk values (one fixed reduction tree), the logits are recomputed,
   normalised and summed down the columns in query order; it stores per-(head, chunk) column sums
   (``[B, H, S, N]``, fp32 scratch).
3. ``_column_sum_kernel``, one program per (image, token tile): sums those ``H · S`` partial columns
   in (head, chunk) order and divides by ``H · N``.

Splitting the streamed axis into chunks gives a batch-1 ViT-B/ViT-L layer one program per SM or more,
where one program per (image, tile) gave 7 to 19. Logits are ``q kᵀ · scale + log(size)`` on the key
axis, kept in base 2 (``· log2 e``, ``exp2``/``log2``). For fp16/bf16 inputs the dots run on the
tensor cores on the native dtype with fp32 accumulation: every product of two 16-bit numbers is exact
in fp32, so only the order of the fp32 summation differs from the PyTorch op's fp32 upcast. fp32
inputs (and fp64, converted to fp32) use ``input_precision="ieee"``: no TF32 rounding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import H200, cdiv, padded

LOG2E = 1.4426950408889634
SMS = H200.sms  # the programs a batch-1 launch should reach
# Per SM of the H200 the tiles are chosen for (tomec.bench.kernel_model models the same device).
_SM_TC, _SM_OPS, _SM_LOADS = H200.sm_tc, H200.sm_ops, H200.sm_bytes
SMALL = 16  # rows of a streamed tile: tl.dot's least, and the least padding on the streamed axis


class Plan(NamedTuple):
    """Tiles of both passes: ``big`` rows stay in registers (queries in the row pass, keys in the
    column pass), tiles of ``small`` rows stream past them, and the stream of each resident tile is
    split into (at most) ``splits`` chunks of whole tiles, one program each."""

    big: int
    small: int = SMALL
    splits: int = 1
    num_warps: int = 4


def _chunks(n: int, small: int, splits: int) -> tuple[int, int]:
    """(rows per chunk, chunks): ``splits`` chunks of whole tiles at most, none empty."""
    tiles = cdiv(n, small)
    per = cdiv(tiles, max(1, min(splits, tiles)))
    return per * small, cdiv(tiles, per)


def _plan_time(bh: int, n: int, d: int, element: int, native: bool, big: int, small: int,
               chunks: int) -> tuple[float, int]:
    """(seconds, bytes loaded): a lower bound of one pass (both cost about the same) from every
    logit of every head in whole tiles on the tensor cores (16-bit) or the CUDA cores (fp32) and
    every program's loads, over the SMs the grid reaches."""
    block_d = max(16, triton.next_power_of_2(d))
    tiles = cdiv(n, big)
    logits = bh * padded(n, big) * padded(n, small)
    if native:
        t_logits = logits * max(2 * block_d / _SM_TC, 6 / _SM_OPS)
    else:
        t_logits = logits * (2 * block_d + 6) / _SM_OPS
    loads = bh * n * ((chunks + tiles) * d * element + tiles * chunks * 4)
    return max(t_logits, loads / _SM_LOADS) / min(SMS, bh * tiles * chunks), loads


@functools.lru_cache(maxsize=None)
def plan_for(batch: int, heads: int, n: int, d: int, native: bool, element: int = 2) -> Plan:
    """The tiles with the least modelled time: tiles pad the logits (tensor-core work is whole
    tiles), a smaller resident tile re-reads the streamed rows more often, and more chunks reach more
    SMs but re-read the resident tiles; no more chunks than one program per SM needs, and none of a
    single streamed tile (a loop of one step overlaps no load with compute). Resident tiles
    and warps are bounded so that no configuration spills (checked by tomec.bench.aot)."""
    block_d = max(16, triton.next_power_of_2(d))
    if native:
        bigs = (16, 32, 64, 128) if block_d <= 64 else (16, 32, 64)
    else:
        bigs = (16, 32, 64) if block_d <= 64 else (16, 32)
    bh, stream = batch * heads, cdiv(n, SMALL)
    best_t, best = (float("inf"), 0), Plan(16)
    for big in bigs:
        if big > 16 and big // 2 >= n:
            break  # a tile of twice the tokens or more
        tiles = cdiv(n, big)
        for want in range(1, min(max(1, stream // 2), cdiv(SMS, bh * tiles)) + 1):
            chunks = _chunks(n, SMALL, want)[1]
            t = _plan_time(bh, n, d, element, native, big, SMALL, chunks)
            if t < best_t:  # equal times: fewer bytes loaded, then the smaller tile, fewer chunks
                warps = 8 if not native and block_d > 64 and big == 32 else 4
                best_t, best = t, Plan(big, SMALL, chunks, warps)
    return best


def _pass_cost(args, resident: int, stream: int, stats_in: int, stats_out: int) -> dict:
    """Both passes compute every (query, key) logit of every head once, padded to whole tiles:
    ``resident``/``stream``: the two tile heights; ``stats_in``/``stats_out``: fp32 values per
    (image, head, token) read/written (log-sum-exps, column sums)."""
    q = args["q_ptr"]
    batch, heads, n, d = q.shape
    e, block_d = q.element_size(), args["BLOCK_D"]
    native = args["NATIVE"]
    bh = batch * heads
    tiles = cdiv(n, resident)
    chunks = args["S_OUT"]
    logits = bh * padded(n, resident) * padded(n, stream)
    dot = 2 * block_d * logits
    # per logit: scale and bias (an FMA), the exp2, the sum, and the row pass's max and subtraction
    # (the column pass's subtraction of the log-sum-exp): 6 and 5
    per_logit = 6 if stats_in == 0 else 5
    if stats_in == 0:  # per query row and key tile: the online rescale (max, sub, exp2, FMA)
        per_rows = bh * padded(n, resident) * (cdiv(n, stream) * 5 + 2 * chunks)
    else:  # per query row and key-tile program: the log-sum-exp combine over the chunks padded to a
        # power of two (select, max, sub, exp2, sum a chunk; log2, add, select)
        per_rows = bh * tiles * padded(n, stream) * (5 * triton.next_power_of_2(stats_in) + 3)
    flops = logits * per_logit + per_rows + (0 if native else dot)
    bias = batch * n * args["bias_ptr"].element_size() if args["HAS_BIAS"] else 0
    moved = 2 * bh * n * d * e + bias + bh * n * 4 * (stats_in + stats_out)
    loads = (bh * chunks * n * d * e  # the resident tiles, once per chunk
             + bh * tiles * n * d * e  # the streamed rows, once per resident tile
             + (bias // batch) * bh * (tiles if stats_in == 0 else chunks)
             + bh * tiles * n * 4 * stats_in + bh * n * 4 * stats_out)
    return {"flops": flops, "tc_flops": dot if native else 0, "bytes": moved, "loads": loads}


def _row_lse_cost(grid, metadata, args):
    return _pass_cost(args, args["BLOCK_M"], args["BLOCK_N"], 0, args["S_OUT"])


def _column_mean_cost(grid, metadata, args):
    return _pass_cost(args, args["BLOCK_N"], args["BLOCK_M"], args["S_IN"], args["S_OUT"])


def _column_sum_cost(grid, metadata, args):
    out = args["out_ptr"]
    batch, n = out.shape
    rows = args["R"]
    moved = batch * n * 4 * (rows + 1)  # R partial sums read, the mean written
    return {"flops": batch * padded(n, args["BLOCK"]) * (rows + 1), "bytes": moved, "loads": moved}


# The kernels call no @triton.jit helper: Triton's interpreter re-patches the language on every
# call of one (milliseconds each), which made the per-tile loops the interpreter tests' main cost.
# Operands: the input's 16-bit dtype when NATIVE (tensor cores: exact products, fp32 accumulation),
# else fp32 with input_precision="ieee" (no TF32). Key biases: log2(size) (0 without sizes) and -inf
# past N, so the keys past N drop out of every sum without a select on the logits.


@triton.jit(launch_metadata=_row_lse_cost)
def _row_lse_kernel(
    q_ptr, k_ptr, bias_ptr, lse_ptr, N, D, c, S_OUT, CHUNK,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_bb, stride_bn,
    HAS_BIAS: tl.constexpr, NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (image, head, query tile · S_OUT + chunk): the base-2 log-sum-exp of each query row
    over the keys ``[chunk · CHUNK, (chunk + 1) · CHUNK)``."""
    # the image index in 64 bits: B · N · 3C elements of a fused qkv can pass 2^31
    img, head, pid = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    tile, chunk = pid // S_OUT, pid % S_OUT
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    q_head = q_ptr + img * stride_qb + head * stride_qh
    q = tl.load(q_head + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < N) & dmask, other=0.0)
    if not NATIVE:
        q = q.to(tl.float32)
    start = chunk * CHUNK
    offs_n = start + tl.arange(0, BLOCK_N)
    k_head = k_ptr + img * stride_kb + head * stride_kh
    k_ptrs = k_head + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    b_ptrs = bias_ptr + img * stride_bb + offs_n * stride_bn
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for _ in range(start, tl.minimum(start + CHUNK, N), BLOCK_N):
        nmask = offs_n < N
        k = tl.load(k_ptrs, mask=nmask[:, None] & dmask, other=0.0)
        if NATIVE:
            s = tl.dot(q, tl.trans(k))
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        if HAS_BIAS:
            size = tl.load(b_ptrs, mask=nmask, other=1.0)
            b = tl.where(nmask, tl.log2(size.to(tl.float32)), float("-inf"))
        else:
            b = tl.where(nmask, 0.0, float("-inf"))
        s = s * c + b[None, :]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid key
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
        offs_n += BLOCK_N
        k_ptrs += BLOCK_N * stride_kn
        b_ptrs += BLOCK_N * stride_bn
    row = (img * tl.num_programs(1) + head) * S_OUT + chunk
    tl.store(lse_ptr + row * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


@triton.jit(launch_metadata=_column_mean_cost)
def _column_mean_kernel(
    q_ptr, k_ptr, bias_ptr, lse_ptr, part_ptr, N, D, c, S_IN, S_OUT, CHUNK,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_bb, stride_bn,
    HAS_BIAS: tl.constexpr, NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, S_P2: tl.constexpr,
):
    """Program (image, head, key tile · S_OUT + chunk): the column sums of the softmax over the
    queries ``[chunk · CHUNK, (chunk + 1) · CHUNK)``, for the key tile."""
    img, head, pid = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    tile, chunk = pid // S_OUT, pid % S_OUT
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    nmask = offs_n < N
    k_head = k_ptr + img * stride_kb + head * stride_kh
    k = tl.load(k_head + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=nmask[:, None] & dmask, other=0.0)
    if not NATIVE:
        k = k.to(tl.float32)
    if HAS_BIAS:
        size = tl.load(bias_ptr + img * stride_bb + offs_n * stride_bn, mask=nmask, other=1.0)
        b = tl.where(nmask, tl.log2(size.to(tl.float32)), float("-inf"))
    else:
        b = tl.where(nmask, 0.0, float("-inf"))
    start = chunk * CHUNK
    offs_m = start + tl.arange(0, BLOCK_M)
    q_head = q_ptr + img * stride_qb + head * stride_qh
    q_ptrs = q_head + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    lse_ptrs = lse_ptr + (img * tl.num_programs(1) + head) * S_IN * N + offs_m
    offs_s = tl.arange(0, S_P2)
    smask = offs_s < S_IN
    acc = tl.zeros([BLOCK_N], tl.float32)
    for _ in range(start, tl.minimum(start + CHUNK, N), BLOCK_M):
        mmask = offs_m < N
        q = tl.load(q_ptrs, mask=mmask[:, None] & dmask, other=0.0)
        # each row's log-sum-exp from its S_IN key chunks (a [S_P2, BLOCK_M] tile, -inf past S_IN;
        # rows past N read 0s, so that every term stays finite)
        x = tl.load(lse_ptrs + offs_s[:, None] * N, mask=smask[:, None] & mmask[None, :], other=0.0)
        x = tl.where(smask[:, None], x, float("-inf"))
        m_r = tl.max(x, axis=0)
        l_r = tl.sum(tl.exp2(x - m_r[None, :]), axis=0)
        lse = tl.where(mmask, m_r + tl.log2(l_r), float("inf"))  # rows past N add exp2(-inf) = 0
        if NATIVE:
            s = tl.dot(k, tl.trans(q))  # [keys, queries]
        else:
            s = tl.dot(k, tl.trans(q.to(tl.float32)), input_precision="ieee")
        s = s * c + b[:, None]
        acc += tl.sum(tl.exp2(s - lse[None, :]), axis=1)
        offs_m += BLOCK_M
        q_ptrs += BLOCK_M * stride_qn
        lse_ptrs += BLOCK_M
    row = (img * tl.num_programs(1) + head) * S_OUT + chunk
    tl.store(part_ptr + row * N + offs_n, acc, mask=nmask)


@triton.jit(launch_metadata=_column_sum_cost)
def _column_sum_kernel(part_ptr, out_ptr, N, R, count, stride_ob, BLOCK: tl.constexpr):
    """Program (image, token tile): the ``R`` partial column sums added in order, over ``count``."""
    img = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    for r in range(R):
        acc += tl.load(part_ptr + (img * R + r) * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + img * stride_ob + offs, acc / count, mask=mask)


def launch_attention_received(
    q: torch.Tensor, k: torch.Tensor, size: Optional[torch.Tensor], scale: float, out: torch.Tensor,
    plan: Optional[Plan] = None,
) -> None:
    """Fill ``out [B, N]`` (fp32) with the mean over heads and queries of
    ``softmax(q kᵀ · scale + log size)``; q, k ``[B, H, N, d]`` (any strides), size ``[B, N, 1]`` or
    None. ``plan``: the tiles (:func:`plan_for` when None)."""
    batch, heads, n, d = q.shape
    native = q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
    if plan is None:
        plan = plan_for(batch, heads, n, d, native, q.element_size() if native else 4)
    block_d = max(16, triton.next_power_of_2(d))
    chunk, splits = _chunks(n, plan.small, plan.splits)
    lse = torch.empty(batch, heads, splits, n, device=q.device, dtype=torch.float32)
    part = torch.empty(batch, heads, splits, n, device=q.device, dtype=torch.float32)
    has_bias = size is not None
    bias = size if has_bias else out  # a valid pointer, never read
    bias_strides = (size.stride(0), size.stride(1)) if has_bias else (0, 0)
    strides = (q.stride(0), q.stride(1), q.stride(2), q.stride(3),
               k.stride(0), k.stride(1), k.stride(2), k.stride(3), *bias_strides)
    c = float(scale) * LOG2E
    meta = dict(HAS_BIAS=has_bias, NATIVE=native, BLOCK_D=block_d, num_warps=plan.num_warps)
    wrap_triton(_row_lse_kernel)[(batch, heads, cdiv(n, plan.big) * splits)](
        q, k, bias, lse, n, d, c, splits, chunk, *strides,
        BLOCK_M=plan.big, BLOCK_N=plan.small, **meta)
    wrap_triton(_column_mean_kernel)[(batch, heads, cdiv(n, plan.big) * splits)](
        q, k, bias, lse, part, n, d, c, splits, splits, chunk, *strides,
        BLOCK_M=plan.small, BLOCK_N=plan.big, S_P2=triton.next_power_of_2(splits), **meta)
    wrap_triton(_column_sum_kernel)[(batch, cdiv(n, 32))](
        part, out, n, heads * splits, heads * n, out.stride(0), BLOCK=32, num_warps=1)


@triton_op("tomec::attention_received", mutates_args=())
def attention_received(
    q: torch.Tensor, k: torch.Tensor, size: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """``q, k [B, H, N, d]``, ``size [B, N, 1]`` or None ``-> [B, N]`` fp32: the attention each token
    receives, averaged over heads and queries (see :func:`tomec.ops.attention.attention_received`)."""
    out = torch.empty(q.shape[0], q.shape[2], device=q.device, dtype=torch.float32)
    launch_attention_received(q, k, size, scale, out)
    return out


@attention_received.register_fake
def _(q: torch.Tensor, k: torch.Tensor, size: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[2], dtype=torch.float32)
