"""Model coverage (timm families): ``r=0`` equals the unmerged model, the tokens entering each block
follow the schedule, and the merged logits match the eager reference. Random weights, batch 2,
``compiler="eager"`` (the graph pass without Inductor's compile time)."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

from tomec import methods, reference

from .helpers import TOLERANCE, compile_tomec, reference_of, relative_error

# (timm name, create_model kwargs, prefix tokens, what it covers); depth cut to keep the suite short:
# what is covered is the block structure, which every depth repeats.
TIMM_FAMILIES = [
    ("deit_small_patch16_224", {"depth": 2}, 1, "DeiT-S width (384, 6 heads)"),
    ("deit_base_patch16_224", {"depth": 2}, 1, "DeiT-B width (768, 12 heads)"),
    ("vit_large_patch16_224", {"depth": 2}, 1, "ViT-L width (1024, 16 heads)"),
    ("deit3_small_patch16_224", {"depth": 4}, 1, "LayerScale"),
    ("deit_tiny_distilled_patch16_224", {"depth": 4}, 2, "CLS + distillation token, two heads"),
    ("vit_small_patch16_224", {"qk_norm": True, "depth": 4}, 1, "q/k norm"),
    ("vit_base_patch16_clip_224", {"depth": 4}, 1, "CLIP: pre-norm before the blocks"),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224, "depth": 4}, 5, "DINOv2: 4 registers, LayerScale"),
    ("vit_medium_patch16_reg4_gap_256", {"depth": 4}, 4, "registers, global average pool"),
    ("vit_small_patch16_384", {"depth": 4}, 1, "384 px: 577 tokens"),
]


def _build(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _images(model: nn.Module, batch: int = 2) -> torch.Tensor:
    side = model.patch_embed.img_size[0]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


def _check_family(name: str, kwargs: dict, prefix: int, method: str, compiler: str = "eager") -> None:
    model = _build(name, kwargs)
    x = _images(model)
    with torch.no_grad():
        plain = model(x)
        unmerged, be0 = compile_tomec(model, method=method, r=0, compiler="eager")
        if methods.get(method).reorders_at_r0:  # LTMP permutes its tokens even so
            assert relative_error(unmerged(x), plain) <= TOLERANCE
        else:
            assert torch.equal(unmerged(x), plain)  # r=0: the graph is left as it was
        n0 = model.patch_embed.num_patches + prefix
        r = 2 * len(model.blocks)
        compiled, be = compile_tomec(model, method=method, r=r, compiler=compiler)
        out = compiled(x)
        ref = reference_of(model, method=method, r=r)
        expect = ref(x)
    assert be0.tokens_per_block == [n0] * len(model.blocks)
    assert sum(be.schedule) == r
    assert be.tokens_per_block == [n0 - sum(be.schedule[:i]) for i in range(len(be.schedule))]
    assert reference.state(ref).tokens_per_block == be.tokens_per_block
    assert relative_error(out, expect) <= TOLERANCE


@pytest.mark.parametrize("name,kwargs,prefix,_", TIMM_FAMILIES, ids=[f[0] for f in TIMM_FAMILIES])
def test_timm_family(name, kwargs, prefix, _):
    _check_family(name, kwargs, prefix, "tome")


# Every method where the prefix tokens and pooling differ from plain ViT.
_PREFIX_FAMILIES = [f for f in TIMM_FAMILIES if f[2] != 1 or "gap" in f[0]]


@pytest.mark.parametrize("method", [m for m in methods.available() if m != "tome"])
@pytest.mark.parametrize("name,kwargs,prefix,_", _PREFIX_FAMILIES, ids=[f[0] for f in _PREFIX_FAMILIES])
def test_timm_family_every_method(name, kwargs, prefix, _, method):
    _check_family(name, kwargs, prefix, method)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,prefix,_", _PREFIX_FAMILIES, ids=[f[0] for f in _PREFIX_FAMILIES])
def test_timm_family_inductor(name, kwargs, prefix, _):
    _check_family(name, {**kwargs, "depth": 3}, prefix, "tome", compiler="inductor")  # 3 blocks: compile time


class BlockStack(nn.Module):
    """The toolbox's usage example: timm ``Block``s and a CLS token, outside ``VisionTransformer``."""

    def __init__(self, dim: int = 64, depth: int = 4, tokens: int = 49) -> None:
        super().__init__()
        self.proj = nn.Linear(48, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads=4) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # [B, T, 48]
        x = self.proj(patches)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.blocks(x)[:, 0])


def test_plain_block_stack_with_cls_token():
    torch.manual_seed(0)
    model = BlockStack().eval()
    x = torch.randn(2, 49, 48)
    with torch.no_grad():
        plain = model(x)
        unmerged, _ = compile_tomec(model, method="tome", r=0, compiler="eager")
        assert torch.equal(unmerged(x), plain)
        compiled, be = compile_tomec(model, method="tome", r=16, compiler="eager")
        out = compiled(x)
    assert sum(be.schedule) == 16
    assert be.tokens_per_block == [50 - sum(be.schedule[:i]) for i in range(4)]
    assert relative_error(out, plain) > 100 * TOLERANCE


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        # windowed attention: the residual stream is [B, H, W, C], not tokens
        ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}, "Swin-style"),
        # SAM: windowed and global blocks on a [B, H, W, C] grid with relative positions
        ("samvit_base_patch16", {"img_size": 256, "depth": 2, "embed_dim": 64, "num_heads": 4,
                                 "global_attn_indexes": (1,), "window_size": 8, "num_classes": 0},
         "as in SAM"),
        # rotary embeddings: a [N, d] table that cannot follow merged tokens
        ("eva02_tiny_patch14_224", {"depth": 2}, "position-dependent attention: .*pos_embed.* \\[256, 128\\]"),
        # relative position bias: a [N, N] index into a learned table
        ("beit_base_patch16_224", {"depth": 2, "embed_dim": 64, "num_heads": 4}, "position-dependent attention"),
        # an MLP of relative coordinates through a flattened [N·N] index (timm's RelPosMlp)
        ("test_vit_relpos", {}, "position-dependent attention: .*relative_position_index.* \\[10000\\]"),
    ],
)
def test_unmergeable_models_are_refused_clearly(name, kwargs, match, capfd):
    from tomec.errors import UnsupportedModelError

    from .test_errors import compile_error

    model = _build(name, kwargs)
    capfd.readouterr()
    err = compile_error(model, _images(model, 1), method="tome", r=8, compiler="eager")
    assert isinstance(err, UnsupportedModelError)
    assert re.search(match, str(err)), str(err)[:500]
    assert "Traceback" not in capfd.readouterr().err  # the refusal is the message, not library log noise
