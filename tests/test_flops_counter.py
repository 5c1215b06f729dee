"""``flops_report`` is FlopCounterMode's count: of the unmerged model, and of the model as the backend
rewrites it (equal to the eager reference's count), over the coverage table's families and a hybrid
ViT; a model the backend refuses is refused with the backend's own error. Meta device throughout
(no weights, nothing computed), except the backend's own refusal on CPU to compare against."""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import tomec
from tomec import cli, reference
from tomec.errors import UnsupportedModelError
from tomec.flops import flops_report, per_block_macs

from .test_coverage import TIMM_FAMILIES

HYBRID = "vit_small_r26_s32_224"  # a ResNet-26 stem before 12 ViT-S blocks on a 7x7 grid
CASES = [(name, kwargs) for name, kwargs, _, _ in TIMM_FAMILIES] + [(HYBRID, {"depth": 2})]


def _meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs).eval()


def _meta_images(model: torch.nn.Module) -> torch.Tensor:
    return torch.empty(1, 3, *model.patch_embed.img_size, device="meta")


def _flop_counter(model: torch.nn.Module, x: torch.Tensor) -> FlopCounterMode:
    """FlopCounterMode over one eager forward (its counts are FLOPs: 2 per MAC)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter


def _module_macs(counter: FlopCounterMode, model: torch.nn.Module, path: str) -> int:
    return sum(counter.get_flop_counts()[f"{type(model).__name__}.{path}"].values()) // 2


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_report_is_flop_counter_mode_of_the_model_and_of_the_merged_model(name, kwargs):
    model = _meta_model(name, **kwargs)
    depth, r = len(model.blocks), 2 * len(model.blocks)
    x = _meta_images(model)
    report = flops_report(model, "tome", r=r)

    plain = _flop_counter(model, x)
    assert report["unmerged_macs"] == plain.get_total_flops() // 2
    assert report["unmerged_block_macs"] == [_module_macs(plain, model, f"blocks.{i}") for i in range(depth)]
    assert report["patch_macs"] == _module_macs(plain, model, "patch_embed")  # a hybrid's backbone too

    ref = reference.patch(copy.deepcopy(model), "tome", r=r)
    merged = _flop_counter(ref, x)
    assert report["schedule"] == reference.state(ref).schedule and sum(report["schedule"]) == r
    assert report["tokens_in"] == reference.state(ref).tokens_per_block
    assert report["macs"] == merged.get_total_flops() // 2
    assert report["block_macs"] == [_module_macs(merged, ref, f"blocks.{i}") for i in range(depth)]
    assert report["macs"] == report["patch_macs"] + sum(report["block_macs"]) + report["other_macs"]
    assert report["ideal_speedup"] == report["unmerged_macs"] / report["macs"] > 1
    if name != HYBRID:  # the hand formula counts a plain ViT's blocks exactly, nothing else
        formula = flops_report(model, "tome", r=r, measure=False)
        assert formula["unmerged_block_macs"] == report["unmerged_block_macs"]
        assert formula["schedule"] == report["schedule"]


def _backend_macs(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> tuple[int, tomec.TomecBackend]:
    """MACs of one run of the model compiled by the backend as a user calls it, FlopCounterMode
    around the compiled graph's run (no per-block split, nothing of ``flops_report``'s own)."""
    be = tomec.backend(compiler="eager", **kwargs)
    counted = []

    def counting(gm, example_inputs):
        compiled = be(gm, example_inputs)

        def run(*args):
            with FlopCounterMode(display=False) as counter:
                out = compiled(*args)
            counted.append(counter.get_total_flops() // 2)
            return out

        return run

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=counting)(x)
    assert len(counted) == 1
    return counted[0], be


@pytest.mark.parametrize("method", ["mctf", "dct"])
def test_methods_that_reduce_elsewhere_are_counted_where_they_do(method):
    # MCTF (one step ahead, its default) merges at a block's input from that block's own attention
    # and leaves block 0 whole; DCT shortens the sequence after the MLP.
    model = _meta_model("deit_tiny_patch16_224", depth=3)
    x = _meta_images(model)
    report = flops_report(model, method, r=30)
    macs, be = _backend_macs(model, x, method=method, r=30)
    assert report["macs"] == macs and report["schedule"] == be.schedule
    assert report["macs"] == report["patch_macs"] + sum(report["block_macs"]) + report["other_macs"]
    tome = flops_report(model, "tome", schedule=report["schedule"])
    if method == "mctf":
        # tomec's graph runs the fused qkv projection on both token sets and the merge on the map:
        # more than the official code's forms (the hand formula's "ahead" site), and here more than
        # an unmerged block in the first merging one
        assert report["schedule"][0] == 0 and report["block_macs"][0] == report["unmerged_block_macs"][0]
        official = per_block_macs(197, report["schedule"], 192, site="ahead")
        assert all(b > o for b, o in zip(report["block_macs"][1:], official[1:]))
        assert report["macs"] > tome["macs"]
    else:  # the eager reference's count, block by block; its MLPs see the unreduced count
        ref = reference.patch(copy.deepcopy(model), method, r=30)
        merged = _flop_counter(ref, x)
        assert report["block_macs"] == [_module_macs(merged, ref, f"blocks.{i}") for i in range(3)]
        assert report["unmerged_macs"] > report["macs"] > tome["macs"]


def test_hybrid_counts_its_resnet_stem():
    # `tomec flops --model vit_small_r26_s32_224 --r 20` printed an ideal speedup of 1.33 from the
    # blocks alone (1.12 GMACs); FlopCounterMode counts 3.44, most of it in the ResNet stem.
    formula = flops_report(HYBRID, "tome", r=20, measure=False)
    assert round(formula["ideal_speedup"], 2) == 1.33
    report = flops_report(HYBRID, "tome", r=20)
    assert report["schedule"] == formula["schedule"] == [4, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    model = _meta_model(HYBRID)
    assert report["unmerged_macs"] == _flop_counter(model, _meta_images(model)).get_total_flops() // 2
    assert round(report["unmerged_macs"] / 1e9, 2) == 3.46
    assert report["patch_macs"] > 0.6 * report["unmerged_macs"]
    assert report["ideal_speedup"] == pytest.approx(1.09, abs=0.01)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("eva02_tiny_patch14_224", {"depth": 2}, r"position-dependent attention: .*pos_embed.* \[256, 128\]"),
        ("beit_base_patch16_224", {"depth": 2, "embed_dim": 64, "num_heads": 4}, "position-dependent attention"),
    ],
)
def test_refused_with_the_backends_own_error(name, kwargs, match):
    from .test_coverage import _build, _images
    from .test_errors import compile_error

    model = _build(name, kwargs)  # real weights on CPU: the backend as a user runs it
    expected = compile_error(model, _images(model, 1), method="tome", r=8, compiler="eager")
    assert isinstance(expected, UnsupportedModelError) and re.search(match, str(expected))
    for given in (model, _meta_model(name, **kwargs)):
        with pytest.raises(UnsupportedModelError) as info:
            flops_report(given, "tome", r=8)
        assert type(info.value) is type(expected) and str(info.value) == str(expected)


def test_flops_command_refuses_eva02():
    # It printed a schedule and a speedup for a model the backend refuses.
    with pytest.raises(UnsupportedModelError, match="position-dependent attention"):
        cli.main(["flops", "--model", "eva02_tiny_patch14_224", "--r", "8"])
