"""The block finder: timm's attention forms, attention pooling skipped and refused on merged tokens."""

from __future__ import annotations

import pytest
import torch

import tomec
from tests.helpers import images, make_model, trace
from tomec.errors import UnsupportedModelError
from tomec.passes import find_blocks


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
