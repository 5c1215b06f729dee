"""The registry and the block step every method shares: options, merge_step's properties, model parity
(eager compiler and Inductor) and r = 0 for every method."""

from __future__ import annotations

import itertools

import pytest
import torch

import tomec
from tests.helpers import TOLERANCE, check_parity, compile_tomec, images, make_model, relative_error
from tomec import methods
from tomec.errors import ConfigError





def test_unknown_options_list_the_valid_ones():
    with pytest.raises(ConfigError, match="method 'pitome' has no option 'margn'; its options are: bsm_first, margin"):
        tomec.backend(method="pitome", r=10, margn=0.3)
    with pytest.raises(ConfigError, match="bsm_first must be True or False"):
        tomec.backend(method="pitome", r=10, bsm_first="yes")
    with pytest.raises(ConfigError, match="does not support source tracking"):
        tomec.backend(method="dct", r=10, trace_source=True)



@pytest.mark.parametrize("method", [m for m in methods.available() if methods.get(m).transform is None])
def test_properties_of_the_merge_step(method):
    """Three chained block steps (one for FPET, whose grid must be square): sizes sum to the patches
    kept, protected tokens stay first and unchanged, sources agree."""
    spec = methods.get(method)
    options = spec.make_options({})
    g = torch.Generator().manual_seed(3)
    n, protected, heads = 38, 2, 4  # 36 patches: a 6 x 6 grid
    x = torch.randn(3, n, 16, generator=g)
    keys, queries = (torch.randn(3, heads, n, 8, generator=g) for _ in range(2))
    size, source, total = None, None, n
    prefix = x[:, :protected].clone()
    for layer, r in enumerate([10] if method == "fpet" else [10, 8, 5]):
        plan = spec.layer_merge(options, layer, 6, r)
        params = None
        if spec.params is not None:  # learned tensors (DTEM's heads), as the passes give them
            params = spec.params(options, layer=layer, num_layers=6, channels=16, head_dim=8)
        x, size, source = methods.merge_step(
            x, size, source, keys[:, :, : x.shape[1]], queries[:, :, : x.shape[1]], method=method,
            r=r, protected=protected, layer=layer, num_layers=6, trace_source=True,
            options=options, attn_in=x, params=params,
        )
        total -= plan.n_dropped
        assert x.shape[1] == size.shape[1]
        torch.testing.assert_close(x[:, :protected], prefix)  # protected: first and unchanged
        assert torch.equal(source[:, :protected], torch.arange(protected).expand(3, protected))
        for b in range(3):  # a source entry per original token kept; counts agree with sizes
            counts = torch.bincount(source[b][source[b] >= 0], minlength=x.shape[1]).float()
            assert (counts >= 1).all() and counts.sum() == total
            if method != "diffrate":  # DiffRate's sizes are similarity-weighted, not counts
                assert torch.equal(counts, size[b, :, 0])



@pytest.mark.parametrize(
    "method,name,fused,batch",
    [
        (m, name, fused, batch)
        for m in ["tofu", "pitome", "dct", "diffrate"]
        for name, fused, batch in itertools.product(["test_vit", "deit_tiny_patch16_224"], [True, False], [1, 4])
    ],
)
def test_model_parity_eager_compiler(method, name, fused, batch):
    check_parity(name, fused, batch, method=method, trace_source=methods.get(method).supports_source)



@pytest.mark.parametrize("method", methods.available())
def test_r0_equals_unmerged(method):
    model = make_model("test_vit")
    x = images("test_vit", 2)
    compiled, be = compile_tomec(model, method=method, r=0, compiler="eager")
    with torch.no_grad():
        out, plain = compiled(x), model(x)
    if methods.get(method).reorders_at_r0:  # LTMP still permutes its tokens: the same up to rounding
        assert relative_error(out, plain) <= TOLERANCE and not torch.equal(out, plain)
    else:
        assert torch.equal(out, plain)
    assert be.schedule == [0] * 6



@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in methods.available() if m not in ("tome", "ltmp")])
def test_model_parity_inductor(method):
    """Every method's ops under Inductor (ToMe: test_backend; LTMP with its counts: test_ltmp)."""
    check_parity("test_vit", True, 4, method=method, compiler="inductor", depth=3)
