"""The attention primitives: the size-weighted mean and log(size) bias, the manual chain against SDPA."""

from __future__ import annotations


import torch

from tomec import ops


def test_size_weighted_mean_and_bias():
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    size = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 2, dtype=torch.float64)[..., None]
    expanded = torch.repeat_interleave(x, size[0, :, 0].long(), dim=1)  # each token as its patches
    torch.testing.assert_close(ops.size_weighted_mean(x, size), expanded.mean(1))
    bias = ops.log_size_bias(size, torch.float32)
    assert bias.shape == (2, 1, 1, 4) and bias.dtype == torch.float32
    torch.testing.assert_close(bias[0, 0, 0], size[0, :, 0].log().float())



def test_attention_chain_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 1, 1, 9, dtype=torch.float64)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(ops.attention(q, k, v, bias), expect)
