"""The plan: prefix tokens counted before the first block."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_model, trace
from tomec.passes import find_blocks
from tomec.passes.plan import count_prefix_tokens


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
