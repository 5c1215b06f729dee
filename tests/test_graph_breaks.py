"""Graph breaks: a model split into several graphs is told apart from several models.

A graph without attention blocks before or after the block graph (the stem, the head) compiles
unchanged; a block graph that holds fewer of the model's attention modules than it has is an error
that names the break, in strict and non-strict mode alike; a block graph that resumes after a break
never merges the prefix tokens it cannot see concatenated."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch

import tomec
from tomec.errors import UnsupportedModelError

from .helpers import TOLERANCE, reference_of, relative_error
from .test_coverage import BlockStack


def _run(model: torch.nn.Module, x: torch.Tensor, **kwargs: Any) -> tuple[Any, tomec.TomecBackend]:
    torch._dynamo.reset()
    be = tomec.backend(compiler="eager", **kwargs)
    with torch.no_grad():
        return torch.compile(model, backend=be)(x), be


def _break_error(model: torch.nn.Module, x: torch.Tensor, **kwargs: Any) -> UnsupportedModelError:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=tomec.backend(compiler="eager", **kwargs))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info, torch.no_grad():
        compiled(x)
    err = info.value.inner_exception
    assert isinstance(err, UnsupportedModelError), repr(err)
    return err


def _vit(**kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=4, img_size=64, **kwargs).eval()


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


class BrokenStack(BlockStack):
    """Blocks split by a graph break (a print between blocks, as debugging code does)."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.proj(patches)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks[1](self.blocks[0](x))
        torch._dynamo.graph_break()  # outside a loop: Dynamo compiles the graph up to here
        x = self.blocks[3](self.blocks[2](x))
        return self.head(x[:, 0])


@pytest.mark.parametrize("strict", [True, False])
def test_graph_break_between_blocks_is_named(strict):
    torch.manual_seed(0)
    err = _break_error(BrokenStack().eval(), torch.randn(2, 49, 48), method="tome", r=16, strict=strict)
    assert "holds 2 of the model's 4 attention modules" in str(err)
    assert "graph break after 2 attention blocks" in str(err) and "fullgraph=True" in str(err)
    assert "test_graph_breaks.py" in str(err)  # where the break is


@pytest.mark.parametrize("strict", [True, False])
def test_break_inside_the_block_loop_is_named(strict):
    """A hook's break in the loop makes Dynamo compile ``Block.forward`` alone (one graph for every
    block); merging it would remove the whole schedule in each block and merge the CLS token."""
    model = _vit()
    model.blocks[2].register_forward_hook(lambda module, args, out: torch._dynamo.graph_break())
    err = _break_error(model, X, method="tome", r=12, strict=strict)
    assert "holds 1 of the model's 4 attention modules (Attention)" in str(err), str(err)
    assert "Block.forward" in str(err) and "test_graph_breaks.py" in str(err)


class StemBreak(torch.nn.Module):
    """A graph break after the embedding: the CLS token is concatenated in the graph before the blocks'."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit._pos_embed(self.vit.patch_embed(images))
        torch._dynamo.graph_break()
        return self.vit.forward_head(self.vit.norm(self.vit.blocks(x)))


def test_break_before_the_blocks_protects_the_model_prefix_tokens():
    vit = _vit()
    model = StemBreak(vit).eval()
    model.num_prefix_tokens = vit.num_prefix_tokens  # what timm's ViT carries
    out, be = _run(model, X, method="tome", r=12)
    assert be.protected == 1 and sum(be.schedule) == 12
    assert "the model's stem, compiled unchanged" in be.report()
    with torch.no_grad():
        expect = reference_of(vit, method="tome", r=12)(X)
    assert relative_error(out, expect) <= TOLERANCE


def test_break_before_the_blocks_without_a_prefix_count_asks_for_protect():
    model = StemBreak(_vit()).eval()  # no num_prefix_tokens: the CLS token is out of the graph's sight
    err = _break_error(model, X, method="tome", r=12)
    assert "starts after a graph break" in str(err) and "protect=" in str(err)
    out, be = _run(model, X, method="tome", r=12, protect=1)
    assert be.protected == 1
    with torch.no_grad():
        assert relative_error(out, reference_of(model.vit, method="tome", r=12)(X)) <= TOLERANCE


class HeadBreak(torch.nn.Module):
    """The blocks in one graph, the classifier after a break (as Hugging Face's hooks do)."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.forward_features(images)
        torch._dynamo.graph_break()
        return self.vit.forward_head(x)


def test_head_after_a_break_compiles_unchanged_after_the_block_graph():
    vit = _vit()
    out, be = _run(HeadBreak(vit).eval(), X, method="tome", r=12)  # strict: the head graph has no block
    assert sum(be.schedule) == 12 and be.protected == 1
    assert "head after its block graph, compiled unchanged" in be.report()
    with torch.no_grad():
        assert relative_error(out, reference_of(vit, method="tome", r=12)(X)) <= TOLERANCE


def test_a_model_without_blocks_is_still_refused_across_a_break():
    class Convs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    err = _break_error(Convs(), X, method="tome", r=4)
    assert "no attention block found" in str(err) and "earlier graph of this model ended at a graph break" in str(err)


def test_head_graph_mean_over_merged_tokens_warns():
    """A global-average-pool head after a break cannot see the sizes: said, not silently unweighted."""
    vit = _vit(global_pool="avg", class_token=False)
    with pytest.warns(UserWarning, match="averages the .* merged tokens without their sizes"):
        out, be = _run(HeadBreak(vit).eval(), X, method="tome", r=12, protect=0)
    assert sum(be.schedule) == 12
