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

from tomec.kernels.mctf import launch_attention_received  # noqa: E402
from tomec.ops import attention_received, mctf_match  # noqa: E402

FLOOR = {torch.float32: 1e-6, torch.float16: 2e-5}


def qk(batch, heads, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, n, d, generator=g) for _ in range(2))
    size = torch.randint(1, 6, (batch, n, 1), generator=g).float()
    return q.to(dtype), k.to(dtype), size.to(dtype)


# (N, H, d): one and several tiles of 32, odd and even N, d padded to 16 and to a power of two
@pytest.mark.parametrize(
    "n,heads,d,dtype,with_size",
    [(5, 1, 16, torch.float32, True), (33, 2, 8, torch.float16, True), (40, 3, 20, torch.float32, False),
     (66, 1, 32, torch.float32, True), (17, 2, 64, torch.float16, False)],
)
def test_attention_received_kernel(n, heads, d, dtype, with_size):
    q, k, size = qk(2, heads, n, d, dtype, seed=n + heads)
    size = size if with_size else None
    scale = d**-0.5
    out = torch.full((2, n), float("nan"))
    launch_attention_received(q, k, size, scale, out)
    assert not out.isnan().any()  # every element written
    exact = attention_received(q.double(), k.double(), None if size is None else size.double(), scale)
    plain = attention_received(q, k, size, scale)  # PyTorch in fp32 (the op's accumulation dtype)
    bound = 2 * (plain.double() - exact).abs().max() + FLOOR[dtype]
    assert (out.double() - exact).abs().max() <= bound
    again = torch.full((2, n), float("nan"))
    launch_attention_received(q, k, size, scale, again)
    assert torch.equal(out, again)  # same input, same bits


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
