"""LTMP's thresholds: calibrated to static counts (eager, per image; gated attention included), the
CLI, and learned with the backbone frozen."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import tomec
from tests.helpers import TOLERANCE, images, make_gated_model, make_model, relative_error
from tomec import cli, reference
from tomec.methods.ltmp import ltmp_prune_cap
from tomec.train import ltmp as cal


# --- calibration ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vit():
    return make_model("test_vit", True, depth=3)


def _caps(n, protected, layers):
    merge, prune = [], []
    for _ in range(layers):
        m = (n - protected) // 2
        p = ltmp_prune_cap(n, protected, m)
        merge.append(m)
        prune.append(p)
        n -= m + p
    return {"merge": merge, "prune": prune}


def test_calibrate_extremes(small_vit):
    x = images("test_vit", 2)
    none = cal.calibrate(small_vit, {"merge": [1.5] * 3, "prune": [-1.0] * 3}, x)
    assert none["merge"] == [0, 0, 0] and none["prune"] == [0, 0, 0]
    every = cal.calibrate(small_vit, {"merge": [-1.5] * 3, "prune": [2.0] * 3}, x)
    tokens = every["tokens"]
    assert (every["merge"], every["prune"]) == tuple(_caps(tokens, 1, 3).values())
    assert every["statistic"] == cal.STATISTIC and every["images"] == 2


def test_static_counts_rounding_and_clamping():
    counts = torch.tensor([[[2, 0], [1, 1]], [[3, 1], [1, 2]]])  # 2 images, 2 blocks
    assert cal.static_counts(counts, 20, 1) == {"merge": [3, 1], "prune": [1, 2]}  # 2.5 -> 3, 1.5 -> 2
    counts = torch.tensor([[[9, 1], [5, 0]]])
    assert cal.static_counts(counts, 9, 1) == {"merge": [4, 2], "prune": [0, 0]}  # lowered to the caps


def test_static_counts_reproduce_the_thresholded_model(small_vit):
    # random weights attend almost uniformly (importance ~ 1/101): thresholds just under that
    th = {"merge": [0.5, 0.5, 0.5], "prune": [0.0098, 0.01078, 0.01176]}
    x = images("test_vit", 1)
    logits, counts = cal.threshold_forward(small_vit, x, th)
    assert counts.sum() > 0 and counts[0, :, 1].sum() > 0  # it merges and prunes
    c = {"merge": counts[0, :, 0].tolist(), "prune": counts[0, :, 1].tolist()}
    ref = reference.patch(copy.deepcopy(small_vit), "ltmp", counts=c)
    with torch.no_grad():
        assert relative_error(ref(x), logits) <= TOLERANCE


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "counts.json"
    th = json.dumps({"merge": [0.3] * 6, "prune": [0.005] * 6})
    cli.main(["calibrate", "--model", "test_vit", "--thresholds", th, "--images", "1", "--out",
              str(out), "--quiet"])
    written = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == {"merge": written["merge"], "prune": written["prune"]}
    be = tomec.backend(method="ltmp", counts=str(out), compiler="eager")
    schedule = be.config.resolve_schedule(6, 101, 1)  # test_vit: 100 patches and a CLS token
    assert schedule == [m + p for m, p in zip(written["merge"], written["prune"])]
    (tmp_path / "th.json").write_text(json.dumps({"merge": [0.9] * 6, "prune": [0.0] * 6}))
    cli.main(["calibrate", "--model", "digits", "--thresholds", str(tmp_path / "th.json"),
              "--images", "2", "--quiet"])
    assert len(json.loads(capsys.readouterr().out)["merge"]) == 6


# --- learning the thresholds ------------------------------------------------------------------------


def test_flops_ratio():
    one = torch.ones(())
    assert cal.flops_ratio([one, one], 65, 64, 4.0).item() == pytest.approx(1.0)
    half = cal.flops_ratio([one * 0.5, one * 0.5], 65, 64, 4.0).item()
    assert 0.3 < half < 0.75


def test_train_thresholds_moves_toward_the_target(small_vit):
    x = images("test_vit", 4)
    y = torch.tensor([0, 1, 2, 3])
    before = copy.deepcopy(small_vit.state_dict())
    got = cal.train_thresholds(small_vit, x, y, epochs=3, batch_size=4, target=0.5, progress=False,
                               lr=(0.05, 0.002))
    assert len(got["merge"]) == len(got["prune"]) == 3
    assert all(0.0 <= v <= 1.0 for v in got["merge"] + got["prune"])
    # FLOPs above target: merge thresholds come down, prune thresholds go up (from 0.9 and 0)
    assert max(got["merge"]) < 0.9 and min(got["prune"]) > 0.0
    assert got["history"][0]["flops_ratio"] == pytest.approx(1.0)
    after = small_vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone stays frozen


def test_calibration_applies_the_attention_gate():
    """A gated model calibrates (it was refused): the thresholded forward is the reference's at the
    counts it picked, gate included, as in the compiled model."""
    model = make_gated_model("test_vit", True, depth=3)
    th = {"merge": [0.5, 0.5, 0.5], "prune": [0.0098, 0.01078, 0.01176]}
    x = images("test_vit", 1)
    logits, counts = cal.threshold_forward(model, x, th)
    assert counts.sum() > 0
    c = {"merge": counts[0, :, 0].tolist(), "prune": counts[0, :, 1].tolist()}
    ref = reference.patch(copy.deepcopy(model), "ltmp", counts=c)
    with torch.no_grad():
        assert relative_error(ref(x), logits) <= TOLERANCE
    result = cal.calibrate(model, th, images("test_vit", 2))
    assert len(result["merge"]) == len(result["prune"]) == 3
