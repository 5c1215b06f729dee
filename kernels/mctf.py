"""MCTF's attention received per token, from q and k, without storing the ``N × N`` attention map.

Two launches, no atomics: (1) one program per (image, head, query tile) streams over the key tiles
with an online max and sum and stores each query row's log-sum-exp; (2) one program per
(image, key tile) loops over the heads and query tiles, recomputes the logits, normalises each row
by its log-sum-exp and sums the columns in a fixed order, so the result is the same bit for bit on
every run. Logits: ``q kᵀ · scale`` plus ``log(size)`` on the key axis when sizes are given.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import padded


@triton.jit
def _logits(q, k_ptr, bias_ptr, offs_n, offs_d, N, D, scale, stride_kn, stride_kd, stride_bn,
            HAS_BIAS: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` fp32 logits of the query tile ``q`` against keys ``offs_n``; -inf past N."""
    nmask = offs_n < N
    k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if HAS_BIAS:
        size = tl.load(bias_ptr + offs_n * stride_bn, mask=nmask, other=1.0).to(tl.float32)
        s = s + tl.log(size)[None, :]
    return tl.where(nmask[None, :], s, float("-inf"))


def _attention_cost(grid, args, stream_rows):
    """Both passes compute every (query, key) logit of every head; ``stream_rows``: the q or k rows
    that each program loads besides its own tile."""
    q = args["q_ptr"]
    batch, heads, n, d = q.shape
    row = d * q.element_size()
    pm, pn = padded(n, args["BLOCK_M"]), padded(n, args["BLOCK_N"])
    logits = batch * heads * pm * pn * (2 * args["BLOCK_D"] + 6)  # dot, scale, bias, exp, sum
    moved = batch * heads * n * (2 * row + 4) + batch * n * 4
    programs = grid[0] * grid[1] * (grid[2] if len(grid) > 2 else 1)
    return {"flops": logits, "bytes": moved, "loads": batch * heads * n * row + programs * stream_rows * row}


def _row_lse_cost(grid, metadata, args):
    return _attention_cost(grid, args, args["N"])  # every key of the program's head


def _column_mean_cost(grid, metadata, args):
    return _attention_cost(grid, args, args["H"] * args["N"])  # every query of every head


@triton.jit(launch_metadata=_row_lse_cost)
def _row_lse_kernel(
    q_ptr, k_ptr, bias_ptr, lse_ptr, N, H, D, scale,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_bb, stride_bn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    img, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < N
    q_row = q_ptr + img * stride_qb + head * stride_qh
    q = tl.load(q_row + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mmask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    k_head = k_ptr + img * stride_kb + head * stride_kh
    bias = bias_ptr + img * stride_bb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, N, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        s = _logits(q, k_head, bias, offs_n, offs_d, N, D, scale, stride_kn, stride_kd, stride_bn, HAS_BIAS)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid key
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + (img * H + head) * N + offs_m, m_i + tl.log(l_i), mask=mmask)


@triton.jit(launch_metadata=_column_mean_cost)
def _column_mean_kernel(
    q_ptr, k_ptr, bias_ptr, lse_ptr, out_ptr, N, H, D, scale,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_bb, stride_bn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    img, tile = tl.program_id(0), tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    bias = bias_ptr + img * stride_bb
    acc = tl.zeros([BLOCK_N], tl.float32)
    for head in range(H):
        q_head = q_ptr + img * stride_qb + head * stride_qh
        k_head = k_ptr + img * stride_kb + head * stride_kh
        for i0 in range(0, N, BLOCK_M):
            offs_m = i0 + tl.arange(0, BLOCK_M)
            mmask = offs_m < N
            q = tl.load(q_head + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=mmask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + (img * H + head) * N + offs_m, mask=mmask, other=0.0)
            s = _logits(q, k_head, bias, offs_n, offs_d, N, D, scale, stride_kn, stride_kd, stride_bn, HAS_BIAS)
            p = tl.where(mmask[:, None], tl.exp(s - lse[:, None]), 0.0)
            acc += tl.sum(p, axis=0)
    tl.store(out_ptr + img * N + offs_n, acc / (H * N), mask=offs_n < N)


def launch_attention_received(
    q: torch.Tensor, k: torch.Tensor, size: Optional[torch.Tensor], scale: float, out: torch.Tensor,
    block: int = 32,
) -> None:
    """Fill ``out [B, N]`` (fp32) with the mean over heads and queries of
    ``softmax(q kᵀ · scale + log size)``; q, k ``[B, H, N, d]``, size ``[B, N, 1]`` or None."""
    batch, heads, n, d = q.shape
    block_d = max(16, triton.next_power_of_2(d))
    lse = torch.empty(batch, heads, n, device=q.device, dtype=torch.float32)
    has_bias = size is not None
    bias = size if has_bias else out  # a valid pointer, never read
    bias_strides = (size.stride(0), size.stride(1)) if has_bias else (0, 0)
    common = (
        n, heads, d, scale,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3), *bias_strides,
    )
    meta = dict(HAS_BIAS=has_bias, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d)
    wrap_triton(_row_lse_kernel)[(batch, heads, triton.cdiv(n, block))](q, k, bias, lse, *common, **meta)
    wrap_triton(_column_mean_kernel)[(batch, triton.cdiv(n, block))](q, k, bias, lse, out, *common, **meta)


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
