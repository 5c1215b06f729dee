"""Shape literals: reshape arguments rederived for merged token counts, refused where they cannot be."""

from __future__ import annotations

import pytest

from tomec.passes.shapes import fixed_reshape_args


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
