"""A new method is one file: the variant in ``variant_tome_tokens.py`` registers itself and runs through
the compiled path and the eager reference with nothing else changed."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import check_parity
from tomec import methods
from tomec.errors import ConfigError


@pytest.fixture
def variant():
    from tests.methods import variant_tome_tokens

    yield variant_tome_tokens
    methods.core._REGISTRY.pop("tome_tokens", None)  # other tests see the shipped methods only


def test_a_method_in_one_file_compiles_and_equals_its_reference(variant):
    assert "tome_tokens" in methods.available()
    for normalize in (False, True):
        check_parity("test_vit", True, 2, method="tome_tokens", r=40, normalize=normalize, trace_source=True)
    with pytest.raises(ConfigError, match="tome_tokens: normalize must be True or False"):
        check_parity("test_vit", True, 2, method="tome_tokens", normalize="yes")


def test_the_variant_matches_on_the_tokens_not_the_keys(variant):
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(2, 17, 8, generator=g), torch.randn(2, 2, 17, 4, generator=g)
    found = variant.METHOD.match(
        methods.MatchInput(keys=keys, queries=None, x=x, size=None, r=5, n_dropped=0, protected=1, layer=0,
                           num_layers=1),
        variant.TomeTokensOptions(),
    )
    assert torch.equal(found.dest, methods.get("tome").match(
        methods.MatchInput(keys=x, queries=None, x=x, size=None, r=5, n_dropped=0, protected=1, layer=0,
                           num_layers=1), methods.TomeOptions()).dest)
