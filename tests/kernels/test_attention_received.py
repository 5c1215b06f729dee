"""MCTF's attention-received kernel against the plain-PyTorch op, under TRITON_INTERPRET=1.

Outputs are poisoned before each launch and checked as fully written; against fp64 the kernel's error
is at most twice that of the PyTorch op in the same dtype, plus a small floor (DESIGN.md).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need TRITON_INTERPRET=1 (run by `make test`)", allow_module_level=True)

from tomec.kernels.attention_received import SMS, Plan, _chunks, launch_attention_received, plan_for  # noqa: E402
from tomec.ops import attention_received, mctf_match  # noqa: E402

FLOOR = {torch.float32: 1e-6, torch.float16: 2e-5}


def qk(batch, heads, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, n, d, generator=g) for _ in range(2))
    size = torch.randint(1, 6, (batch, n, 1), generator=g).float()
    return q.to(dtype), k.to(dtype), size.to(dtype)


def check_against_fp64(q, k, size, scale, plan=None):
    """The kernel's output, poisoned first and checked as fully written, within twice the PyTorch
    op's error against fp64 plus the floor; returns it."""
    out = torch.full((q.shape[0], q.shape[2]), float("nan"))
    launch_attention_received(q, k, size, scale, out, plan=plan)
    assert not out.isnan().any()  # every element written
    exact = attention_received(q.double(), k.double(), None if size is None else size.double(), scale)
    plain = attention_received(q, k, size, scale)  # PyTorch in fp32 (the op's accumulation dtype)
    bound = 2 * (plain.double() - exact).abs().max() + FLOOR[q.dtype]
    assert (out.double() - exact).abs().max() <= bound
    return out


# (N, H, d, plan): one and several resident tiles (plan.big) and streamed tiles (plan.small), the
# stream split into several chunks (whose log-sum-exps and column sums are combined), a last chunk
# shorter than the others, odd and even N, d padded to 16 and to a power of two; None: plan_for's
CASES = [
    (5, 1, 16, torch.float32, True, None),
    (33, 2, 8, torch.float16, True, Plan(16, 16, 2)),  # 3 x 3 tiles, chunks of 2 and 1 tiles
    (40, 3, 20, torch.float32, False, Plan(32, 16, 3)),  # 2 x 3 tiles, 3 chunks
    (66, 1, 32, torch.float32, True, Plan(64, 32, 2)),  # 2 x 3 tiles, chunks of 2 and 1 tiles
    (17, 2, 64, torch.float16, False, None),
    (70, 2, 16, torch.float16, True, Plan(32, 16, 3)),  # 3 x 5 tiles, chunks of 2, 2, 1 tiles
]


@pytest.mark.parametrize("n,heads,d,dtype,with_size,plan", CASES)
def test_attention_received_kernel(n, heads, d, dtype, with_size, plan):
    q, k, size = qk(2, heads, n, d, dtype, seed=n + heads)
    check_against_fp64(q, k, size if with_size else None, d**-0.5, plan)


def test_same_bits_every_launch():
    """Two launches of the same input give the same bits (no atomics, fixed summation orders), with
    several heads, resident tiles and chunks; peaked rows (scale 1) whose maxima lie in different key
    chunks test the chunks' log-sum-exp combine."""
    q, k, size = qk(2, 2, 45, 16, torch.float16, seed=7)
    plan = Plan(32, 16, 3)  # 2 x 3 tiles, 3 chunks
    out = check_against_fp64(q, k, size, 1.0, plan)
    again = torch.full_like(out, float("nan"))
    launch_attention_received(q, k, size, 1.0, again, plan=plan)
    assert torch.equal(out, again)


@pytest.mark.parametrize("n,tiles,splits",
                         [(197, 13, 3), (577, 37, 2), (40, 3, 8), (5, 1, 4), (160, 10, 4)])
def test_chunks_are_whole_tiles_and_never_empty(n, tiles, splits):
    chunk, count = _chunks(n, 16, splits)
    assert chunk % 16 == 0 and count <= splits
    assert (count - 1) * chunk < n <= count * chunk  # every chunk starts before N: none is empty
    assert -(-n // 16) == tiles


@pytest.mark.parametrize("heads,n", [(12, 197), (16, 577)])
def test_plan_fills_the_sms_at_batch_1(heads, n):
    """ViT-B at 197 tokens and ViT-L at 577, batch 1 (bf16): one program per SM or more in both
    passes (the grid is (B, H, resident tiles x chunks))."""
    plan = plan_for(1, heads, n, 64, True, 2)
    chunks = _chunks(n, plan.small, plan.splits)[1]
    assert heads * -(-n // plan.big) * chunks >= SMS


def test_through_the_op_layer_with_strides():
    # a non-contiguous q/k (sliced out of a fused qkv, as the blocks hand them over)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 2, 4, 37, 16, generator=g)
    q, k = qkv[0], qkv[1]
    size = torch.randint(1, 4, (2, 37, 1), generator=g).float()
    got = attention_received(q, k, size, 0.3, impl="triton")
    torch.testing.assert_close(got, attention_received(q, k, size, 0.3), rtol=1e-5, atol=1e-6)
    assert torch.equal(attention_received(q, k, size, 0.3, prop_attn=False, impl="triton"),
                       attention_received(q, k, None, 0.3, impl="triton"))
    x = torch.randn(2, 37, 8, generator=g)
    dest = mctf_match(x, q, k, size, 12, 1, impl="triton")[0]
    assert torch.equal(dest, mctf_match(x, q, k, size, 12, 1)[0])


@pytest.mark.parametrize("with_size", [False, True])
def test_attention_received_gradients_equal_torch(with_size):
    """The kernel's registered backward (the PyTorch formula's vector-Jacobian product) against
    autograd through the PyTorch op (fp32): MCTF's weights are differentiable in training."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 19, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 19, 8, generator=g, requires_grad=True)
    size = (torch.randint(1, 4, (2, 19, 1), generator=g).float().requires_grad_() if with_size else None)
    inputs = [t for t in (q, k, size) if t is not None]
    upstream = torch.randn(2, 19, generator=g)
    grads = {}
    for impl in ("triton", "torch"):
        out = attention_received(q, k, size, 0.3, impl=impl)
        grads[impl] = torch.autograd.grad((out * upstream).sum(), inputs)
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
