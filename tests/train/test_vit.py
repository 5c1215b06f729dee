"""The shared timm ViT forward (tomec.train.vit) without merging is the timm model's own forward:
plain and gated attention, fused and manual, q/k norm, average pooling with LayerScale, with and
without sizes of 1 and key weights of 1; its head pools as timm does."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from tests.helpers import images, make_gated_model, make_model, relative_error
from tomec.errors import UnsupportedModelError
from tomec.train import vit

MODELS = {
    "plain": lambda fused: make_model("test_vit", fused, depth=3),
    "gated": lambda fused: make_gated_model("test_vit", fused, depth=3),
    "qk_norm": lambda fused: make_model("test_vit", fused, depth=3, qk_norm=True),
    # no CLS token, a register, average pooling, LayerScale
    "avg_pool": lambda fused: make_model("test_vit2", fused, depth=3),
}


def _forward(model, x, ones=False, **attention):
    """The model's forward through tomec.train.vit; ``ones``: every size (the log-size bias and the
    pooling weights) 1."""
    tokens = vit.embed(model, x)
    size = tokens.new_ones(*tokens.shape[:2], 1) if ones else None
    for block in model.blocks:
        out = vit.attention(block.attn, block.norm1(tokens), size, **attention).out
        tokens = vit.mlp_residual(block, vit.attention_residual(block, tokens, out))
    return vit.head(model, tokens, size)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", list(MODELS))
def test_shared_forward_is_the_timm_forward(kind, fused):
    model = MODELS[kind](fused)
    x = images("test_vit", 2)
    batch, n = 2, vit.embed(model, x[:1]).shape[1]
    with torch.no_grad():
        want = model(x)
        assert torch.equal(_forward(model, x), want)  # timm's own ops, in timm's order
        variants = {
            "sizes of 1": _forward(model, x, ones=True),
            "explicit": _forward(model, x, explicit=True),
            "key weights of 1": _forward(model, x, key_weight=torch.ones(batch, n)),
            "query-key weights of 1": _forward(model, x, ones=True, key_weight=torch.ones(batch, n, n)),
        }
    for name, got in variants.items():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_the_gate_matters():
    """The gated case above is not vacuous: without its gates the model answers otherwise."""
    model = make_gated_model("test_vit", depth=3)
    ungated = copy.deepcopy(model)
    for block in ungated.blocks:
        block.attn.gate = None
    x = images("test_vit", 2)
    with torch.no_grad():
        assert relative_error(_forward(ungated, x), model(x)) > 1e-2


def test_attention_returns_the_map_and_the_keys():
    model = make_model("test_vit", True, depth=1)
    attn, x = model.blocks[0].attn, torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(0))
    size = torch.randint(1, 4, (2, 11, 1), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        fused = vit.attention(attn, x, size)
        explicit = vit.attention(attn, x, size, explicit=True)
        q, k, _ = vit.qkv(attn, x)
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
    assert fused.probs is None and explicit.probs.shape == (2, 2, 11, 11)
    assert torch.equal(explicit.q, q) and torch.equal(explicit.k, k) and torch.equal(fused.k, k)
    torch.testing.assert_close(explicit.probs, logits.softmax(-1))
    torch.testing.assert_close(explicit.out, fused.out, rtol=1e-5, atol=1e-6)
    # key weights: log(size) as a bias is size as a weight on the exponential
    weighted = vit.attention(attn, x, key_weight=size[..., 0])
    torch.testing.assert_close(weighted.probs, explicit.probs, rtol=1e-5, atol=1e-7)
    # a given map is applied to the values
    given = vit.attention(attn, x, probs=explicit.probs)
    torch.testing.assert_close(given.out, explicit.out)


def test_weighted_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g)
    weight = torch.rand(2, 1, 1, 5, dtype=torch.float64, generator=g)
    weight[0, ..., 2] = 0.0
    got = vit.weighted_softmax(logits, weight)
    torch.testing.assert_close(got, (logits + weight.log()).softmax(-1))
    assert (got[0, ..., 2] == 0).all()
    # eps: every share gets eps / N, the sum eps (a row whose weights are all 0 stays defined)
    zero = vit.weighted_softmax(logits, torch.zeros_like(weight), eps=1e-6)
    torch.testing.assert_close(zero, torch.full_like(zero, 1 / 5))


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_training_head_is_timms_head_when_nothing_merged(pool):
    """The training forward's classifier pools as timm does (LTMP's once dropped avgmax's max half);
    a token with weight 0 (masked out) is left out of the max as well as the mean."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, global_pool=pool, num_classes=10).eval()
    x = torch.randn(2, model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim)
    protected = model.num_prefix_tokens
    with torch.no_grad():
        got = vit.head(model, x, torch.ones(*x.shape[:2], 1), protected=protected)
        torch.testing.assert_close(got, model.forward_head(model.norm(x)), rtol=0, atol=0)
        weight = torch.ones(*x.shape[:2], 1)
        weight[:, -3:] = 0  # masked tokens: as if the last three were gone
        masked = vit.head(model, x, weight, protected=protected)
        torch.testing.assert_close(masked, model.forward_head(model.norm(x[:, :-3])), rtol=1e-6, atol=1e-6)
        # pool() is the reference's pooling: the same weighted average, timm's own without sizes
        normed = model.norm(x)
        torch.testing.assert_close(model.head(model.fc_norm(vit.pool(model, normed, weight))), masked)
        assert torch.equal(vit.pool(model, normed), model.pool(normed))


def test_models_without_timm_blocks_are_refused_with_one_message():
    with pytest.raises(UnsupportedModelError, match="holds no timm Block; DTEM training supports timm"):
        vit.timm_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), "DTEM training")
    with pytest.raises(UnsupportedModelError, match="LTMP calibration supports timm VisionTransformer-style"):
        vit.vit_blocks(torch.nn.Linear(2, 2), "LTMP calibration")
