"""``tomec flops`` and the FLOP model: ToMe's published DeiT-S figures, the report's arithmetic, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tomec import cli
from tomec.flops import block_macs, flops_report


# ToMe's DeiT-S table: 4.6 GMACs unmerged; 3.4 / 2.7 / 2.3 at r = 8 / 13 / 16 per block (16 caps at
# 10 in the last block). Measured (FlopCounterMode, the merge steps' matmuls included): 4.599 unmerged,
# 3.426 / 2.713 / 2.301; the hand formula: 4.598, 3.416 / 2.702 / 2.290.
@pytest.mark.parametrize("per_block,gmacs", [(8, 3.4), (13, 2.7), (16, 2.3)])
def test_deit_small_matches_published_gmacs(per_block, gmacs):
    schedule = [per_block] * 11 + [min(per_block, 10)]
    report = flops_report("deit_small_patch16_224", method="tome", schedule=schedule)
    formula = flops_report("deit_small_patch16_224", method="tome", schedule=schedule, measure=False)
    assert report["schedule"] == formula["schedule"] == schedule
    for counted in (report, formula):
        assert round(counted["unmerged_macs"] / 1e9, 1) == 4.6
        assert round(counted["macs"] / 1e9, 1) == gmacs
        assert counted["ideal_speedup"] == pytest.approx(counted["unmerged_macs"] / counted["macs"])
    # the merge steps cost a little (ToMe's bipartite similarity): under 1% here
    assert formula["macs"] < report["macs"] < 1.01 * formula["macs"]


def test_r13_from_a_total_r_is_the_same_schedule():
    report = flops_report("deit_small_patch16_224", method="tome", r=156, inflect=0, measure=False)
    assert report["schedule"] == [13] * 12 and round(report["macs"] / 1e9, 1) == 2.7


def test_report_arithmetic_is_consistent():
    report = flops_report("deit_tiny_patch16_224", method="tome", r=80)
    tokens = report["tokens_in"] + [report["tokens_out"]]
    assert [a - b for a, b in zip(tokens, tokens[1:])] == report["schedule"]
    assert tokens[0] == 197 and report["protected"] == 1 and report["dim"] == 192
    formula = [block_macs(n, n - r, 192) for n, r in zip(report["tokens_in"], report["schedule"])]
    # measured: the formula's matmuls plus the merge's own (the block's similarity matmul)
    assert all(f < m < 1.02 * f for f, m in zip(formula, report["block_macs"]))
    assert report["unmerged_block_macs"] == [block_macs(197, 197, 192)] * 12
    assert report["patch_macs"] == 192 * 3 * 16 * 16 * 196 and report["other_macs"] == 192 * 1000  # the head
    assert report["macs"] == report["patch_macs"] + sum(report["block_macs"]) + report["other_macs"]
    hand = flops_report("deit_tiny_patch16_224", method="tome", r=80, measure=False)
    assert hand["block_macs"] == formula and hand["schedule"] == report["schedule"]
    assert hand["macs"] == hand["patch_macs"] + sum(formula)


def test_dct_reduces_after_the_mlp():
    # DCT shortens the sequence after the MLP, so its MLPs see the unreduced count: fewer MACs saved
    # (the hand formula's "block" site; the measured count: tests/test_flops_counter.py).
    tome = flops_report("deit_tiny_patch16_224", method="tome", r=80, measure=False)
    dct = flops_report("deit_tiny_patch16_224", method="dct", r=80, measure=False)
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
    assert "ideal speedup: 1.695x" in out and "GMACs per image: 2.713 (unmerged 4.599" in out
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
