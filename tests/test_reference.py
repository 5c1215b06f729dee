"""The eager reference patch: the unmerged model at r=0, undo, sizes, sources, attention forms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers import images, make_model, relative_error
from tomec import reference, schedule
from tomec.errors import UnsupportedModelError


@pytest.mark.parametrize("fused", [True, False])
def test_r0_is_the_unmerged_model(fused):
    model = make_model("test_vit", fused)
    x = images("test_vit", 2)
    with torch.no_grad():
        expect = model(x)
        patched = reference.patch(copy.deepcopy(model), "tome", r=0)
        assert torch.equal(patched(x), expect)


def test_unpatch_restores_the_model():
    model = make_model("test_vit")
    x = images("test_vit", 2)
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        expect = model(x)
        reference.patch(model, "tome", r=30)
        assert not torch.equal(model(x), expect)
        reference.unpatch(model)
        assert torch.equal(model(x), expect)
    assert [type(m) for m in model.modules()] == classes
    with pytest.raises(UnsupportedModelError, match="not patched"):
        reference.state(model)


def test_state_schedule_sizes_and_sources():
    model = reference.patch(make_model("test_vit"), "tome", r=30, trace_source=True)
    with torch.no_grad():
        model(images("test_vit", 3))
    st = reference.state(model)
    assert st.schedule == schedule.resolve(6, 101, 1, r=30)
    assert st.tokens_per_block == [101 - sum(st.schedule[:i]) for i in range(6)]
    assert st.size.shape == (3, 71, 1) and (st.size.sum(1) == 101).all()
    for b in range(3):
        counts = torch.bincount(st.source[b], minlength=71).to(st.size.dtype)
        assert torch.equal(counts, st.size[b, :, 0])


def test_fused_and_manual_attention_agree():
    fused, manual = make_model("test_vit", True), make_model("test_vit", False)
    manual.load_state_dict(fused.state_dict())
    x = images("test_vit", 2)
    with torch.no_grad():
        a = reference.patch(fused, "tome", r=40)(x)
        b = reference.patch(manual, "tome", r=40)(x)
    assert relative_error(a, b) <= 1e-5


def test_patch_needs_timm_blocks():
    with pytest.raises(UnsupportedModelError, match="holds no timm Block"):
        reference.patch(nn.Sequential(nn.Linear(4, 4)), "tome", r=1)
