"""``tomec flops`` and the FLOP model: ToMe's published DeiT-S figures, the report's arithmetic, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tomec import cli
from tomec.flops import block_macs, flops_report


def test_deit_small_matches_published_gmacs():
    # METHODS.md / ToMe: DeiT-S 4.6 GMACs unmerged, 2.7 at r = 13 per block.
    report = flops_report("deit_small_patch16_224", method="tome", r=156, inflect=0)
    assert report["schedule"] == [13] * 12
    assert round(report["unmerged_macs"] / 1e9, 1) == 4.6
    assert round(report["macs"] / 1e9, 1) == 2.7
    assert report["ideal_speedup"] == pytest.approx(report["unmerged_macs"] / report["macs"])


def test_report_arithmetic_is_consistent():
    report = flops_report("deit_tiny_patch16_224", method="tome", r=80)
    tokens = report["tokens_in"] + [report["tokens_out"]]
    assert [a - b for a, b in zip(tokens, tokens[1:])] == report["schedule"]
    assert tokens[0] == 197 and report["protected"] == 1
    expected = [block_macs(n, n - r, 192) for n, r in zip(report["tokens_in"], report["schedule"])]
    assert report["block_macs"] == expected
    assert report["macs"] == report["patch_macs"] + sum(expected)


def test_dct_reduces_after_the_mlp():
    # DCT shortens the sequence after the MLP, so its MLPs see the unreduced count: fewer MACs saved.
    tome = flops_report("deit_tiny_patch16_224", method="tome", r=80)
    dct = flops_report("deit_tiny_patch16_224", method="dct", r=80)
    assert dct["schedule"] == tome["schedule"]
    assert 1.0 < dct["ideal_speedup"] < tome["ideal_speedup"]


def test_parse_options_takes_json_values():
    assert cli.parse_options(["bsm_first=false", "margin=0.5", "name=abc"]) == {
        "bsm_first": False, "margin": 0.5, "name": "abc"}
    with pytest.raises(SystemExit, match="name=value"):
        cli.parse_options(["margin"])


def test_flops_command_prints_the_report(capsys):
    cli.main(["flops", "--model", "deit_small_patch16_224", "--r", "156", "--inflect", "0"])
    out = capsys.readouterr().out
    assert "ideal speedup: 1.70" in out and "GMACs per image: 2.70" in out
    cli.main(["flops", "--model", "deit_tiny_patch16_224", "--method", "pitome", "--keep-ratio", "0.9",
              "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "pitome" and sum(report["schedule"]) > 0


def test_flops_command_reports_bad_schedule_clearly(capsys):
    with pytest.raises(Exception, match="196"):
        cli.main(["flops", "--model", "deit_tiny_patch16_224", "--r", "5000"])


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "tomec"
    assert script.exists(), f"no console script at {script}: reinstall the package"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("bench", "flops", "eval", "vis", "digits"):
        assert command in proc.stdout


@pytest.mark.parametrize("what,expect", [("dtem", "--steps"), ("diffrate", "--steps"), ("ltmp", "--target")])
def test_finetune_dispatches_to_each_example(what, expect, capsys):
    from tomec import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", what, "--help"])
    assert e.value.code == 0 and expect in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "nothing"])
    assert e.value.code == 2 and "invalid choice: 'nothing'" in capsys.readouterr().err  # argparse's usage error
