"""Presets: every published setting compiles and runs (random weights, the eager compiler, parity
with the reference), reproduces its reported GFLOPs with tomec's FLOP count, asks for what it needs,
and the README's table is the module's."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import timm
import torch

import tomec
from tests.helpers import TOLERANCE, relative_error
from tomec import cli, presets, reference
from tomec.errors import ConfigError
from tomec.flops import flops_report

README = Path(__file__).resolve().parent.parent / "README.md"


def _artifacts(preset, model):
    """Stand-ins for the trained artifacts a preset requires (untrained, the right shapes)."""
    out = {}
    if "heads" in preset.requires:
        from tomec.train.dtem import DtemHeads

        out["heads"] = DtemHeads.for_model(model)
    if "adapter" in preset.requires:
        from tomec.train.fpet import FpetAdapter

        out["adapter"] = FpetAdapter(model.blocks[0].attn.head_dim)
    if "counts" in preset.requires:
        out["counts"] = {"merge": [8] * 12, "prune": [2] * 12}
    return out


@pytest.mark.parametrize("name", presets.available())
def test_preset_compiles_runs_and_equals_the_reference(name):
    method, model_name = name.split("/")
    preset = presets.find(method, model_name)
    torch.manual_seed(0)
    model = timm.create_model(presets.timm_model(model_name), pretrained=False).eval()
    kwargs = presets.get(method, model_name, **_artifacts(preset, model))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained stand-ins warn as they should
        be = tomec.backend(**kwargs, compiler="eager")
        compiled = torch.compile(model, backend=be, fullgraph=True)
        ref_kwargs = {k: v for k, v in kwargs.items() if k != "method"}
        ref = reference.patch(copy.deepcopy(model), method, **ref_kwargs)
        with torch.no_grad():
            out, want, plain = compiled(x), ref(x), model(x)
    assert be.schedule == reference.state(ref).schedule and sum(be.schedule) > 0
    assert relative_error(out, want) <= TOLERANCE
    assert relative_error(out, plain) > 100 * TOLERANCE


@pytest.mark.parametrize("name", presets.available())
def test_preset_reproduces_its_gflops(name):
    method, model_name = name.split("/")
    preset = presets.find(method, model_name)
    target = preset.schedule_gflops if preset.schedule_gflops is not None else preset.gflops
    if "counts" in preset.requires:
        pytest.skip(f"{name}: its schedule is the calibrated counts the user gives")
    model = timm.create_model(presets.timm_model(model_name), pretrained=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # measure=False: the papers count the blocks' matmuls and the patch embedding, as the formula
        report = flops_report(presets.timm_model(model_name), measure=False,
                              **presets.get(method, model_name, **_artifacts(preset, model)))
    assert abs(report["macs"] / 1e9 - target) <= 0.03, report["macs"] / 1e9


def test_required_artifacts_and_unknown_presets_are_errors():
    with pytest.raises(ConfigError, match=r"preset dtem/deit_small reports its number with trained heads: give heads="):
        presets.get("dtem", "deit_small")
    with pytest.raises(ConfigError, match="no preset for method 'tome' on model 'vit_huge'; presets: tome/deit_small"):
        presets.get("tome", "vit_huge")
    assert presets.get("mctf", "deit_small_patch16_224") == presets.get("mctf", "deit_small")
    assert presets.get("tome", "deit_small", compiler="eager")["compiler"] == "eager"


def test_readme_table_is_the_presets_table():
    assert presets.table() in README.read_text()


def test_cli_flops_takes_a_preset(capsys):
    cli.main(["flops", "--preset", "diffrate/deit_small"])
    assert "GMACs per image: 2.914" in capsys.readouterr().out  # measured: 2.905 by the papers' formula
    cli.main(["flops", "--preset", "mctf/deit_tiny"])  # the preset's own model
    assert capsys.readouterr().out.startswith("deit_tiny_patch16_224 with mctf")
    for extra in (["--r", "13"], ["--method", "tome"]):
        with pytest.raises(ConfigError, match="sets the method and the schedule"):
            cli.main(["flops", "--preset", "tome/deit_small", *extra])
