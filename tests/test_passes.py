"""The graph passes on real Dynamo graphs: block finding, prefix tokens, shape literals, refusals."""

from __future__ import annotations

import pytest
import torch

import tomec
from tests.helpers import images, make_model, trace
from tomec.errors import UnsupportedModelError
from tomec.passes import find_blocks
from tomec.passes.plan import count_prefix_tokens
from tomec.passes.shapes import fixed_reshape_args


@pytest.mark.parametrize("fused,form", [(True, "sdpa"), (False, "manual")])
def test_find_blocks_on_timm(fused, form):
    gm, _ = trace(make_model("test_vit", fused), images("test_vit", 2))
    found = find_blocks(gm)
    assert [b.path for b in found.blocks] == [f"blocks.{i}" for i in range(6)]
    assert {b.form for b in found.blocks} == {form}
    assert {b.num_tokens for b in found.blocks} == {101}
    assert found.skipped == []
    for b in found.blocks:  # the residual add joins the stream and the attention branch
        assert b.stream in b.residual.args and b.k.meta["example_value"].shape == (2, 2, 101, 32)


@pytest.mark.parametrize(
    "name,kwargs,side,expected",
    [
        ("test_vit", {}, 160, 1),
        ("deit_tiny_distilled_patch16_224", {}, 224, 2),
        ("vit_small_patch14_reg4_dinov2", {"img_size": 70}, 70, 5),
        ("test_vit", {"class_token": False, "global_pool": "avg"}, 160, 0),
    ],
)
def test_prefix_tokens(name, kwargs, side, expected):
    gm, _ = trace(make_model(name, **kwargs), torch.randn(2, 3, side, side))
    found = find_blocks(gm)
    assert count_prefix_tokens(found.blocks[0].stream)[0] == expected


def test_attention_pooling_is_skipped_and_refused_when_it_sees_merged_tokens():
    model = make_model("test_vit", global_pool="map")
    gm, _ = trace(model, images("test_vit", 2))
    found = find_blocks(gm)
    assert len(found.blocks) == 6 and len(found.skipped) == 1
    assert "no residual add" in found.skipped[0].reason
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=tomec.backend(r=20, compiler="eager"), fullgraph=True)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info, torch.no_grad():
        compiled(images("test_vit", 2))
    err = info.value.inner_exception
    assert isinstance(err, UnsupportedModelError) and "attn_pool" in str(err)
    assert "would not get proportional attention" in str(err)
    # without proportional attention nothing is missing: it compiles and runs
    torch._dynamo.reset()
    be = tomec.backend(r=20, compiler="eager", prop_attn=False)
    with torch.no_grad():
        out = torch.compile(model, backend=be, fullgraph=True)(images("test_vit", 2))
    assert out.shape == (2, 1000) and sum(be.schedule) == 20


@pytest.mark.parametrize(
    "old_in,new_in,old_out,literal,expected",
    [
        # qkv reshape with batch == heads == 2: the token position changes, not the other 2s
        ((2, 101, 192), (2, 91, 192), (2, 101, 3, 2, 32), [2, 101, 3, 2, 32], [2, 91, 3, 2, 32]),
        # attention output back to [B, N, C]
        ((2, 101, 2, 32), (2, 91, 2, 32), (2, 101, 64), [2, 101, 64], [2, 91, 64]),
        # -1 stays -1, untouched positions stay
        ((2, 101, 192), (2, 91, 192), (2, 101, 3, 2, 32), [2, -1, 3, 2, 32], [2, -1, 3, 2, 32]),
        # flattening batch and tokens together: the merged dimension is the product
        ((2, 101, 64), (2, 91, 64), (202, 64), [202, 64], [182, 64]),
        # tokens equal to the channel count: still matched by position
        ((2, 64, 64), (2, 50, 64), (2, 64, 2, 32), [2, 64, 2, 32], [2, 50, 2, 32]),
        # nothing changed
        ((2, 101, 64), (2, 101, 64), (2, 101, 64), [2, 101, 64], [2, 101, 64]),
    ],
)
def test_fixed_reshape_args_by_position(old_in, new_in, old_out, literal, expected):
    assert fixed_reshape_args(old_in, new_in, old_out, literal) == expected


def test_fixed_reshape_args_refuses_what_it_cannot_derive():
    # tokens folded into channels with another dimension: no unique position to rewrite
    assert fixed_reshape_args((2, 4, 4), (2, 3, 4), (2, 2, 8), [2, 2, 8]) is None
