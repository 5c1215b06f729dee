"""The offline study on real data: the digits ViT shipped in the repo, unmerged and with every method."""

from __future__ import annotations

import pytest
import torch

import tomec
from tomec import methods
from tomec import digits


@pytest.fixture(scope="module")
def study_data():
    model = digits.load_trained()
    _, _, x_test, y_test = digits.digits_data()
    return model, x_test, y_test


def test_data_is_real_and_split_fixed():
    x, y, x_test, y_test = digits.digits_data()
    assert x.shape[1:] == (1, 16, 16) and len(y) + len(y_test) == 1797
    assert set(y_test.tolist()) == set(range(10))
    again = digits.digits_data()
    assert torch.equal(again[3], y_test) and torch.equal(again[2], x_test)


def test_checkpoint_is_small():
    assert digits.CHECKPOINT.stat().st_size < 1_000_000


def test_unmerged_accuracy(study_data):
    model, x, y = study_data
    assert digits.accuracy_of(model, x, y) >= digits.MIN_UNMERGED_ACCURACY


@pytest.mark.parametrize("method", methods.available())
def test_every_method_within_bound_at_moderate_r(study_data, method):
    model, x, y = study_data
    base = digits.accuracy_of(model, x, y)
    torch._dynamo.reset()
    be = tomec.backend(method=method, r=digits.MODERATE_R, compiler="eager")
    merged = torch.compile(model, backend=be)
    accuracy = digits.accuracy_of(merged, x, y)
    assert sum(be.schedule) == digits.MODERATE_R
    assert accuracy >= base - digits.ACCURACY_BOUND, f"{method}: {accuracy:.3f} vs unmerged {base:.3f}"


def test_study_writes_results(tmp_path):
    rows = digits.study(["tome"], rs=(16,), compiler="eager", rounds=1, out=tmp_path)
    assert [(r["method"], r["r"]) for r in rows] == [("unmerged", 0), ("tome", 16)]
    for suffix in ("csv", "json", "png"):
        assert (tmp_path / f"digits.{suffix}").stat().st_size > 0


def test_study_command_writes_to_the_working_directory(tmp_path, monkeypatch, capsys):
    shipped = {p: p.stat().st_mtime_ns for p in digits.RESULTS.glob("digits.*")}
    monkeypatch.chdir(tmp_path)
    digits.main(["study", "--methods", "tome", "--r", "16", "--compiler", "eager", "--rounds", "1"])
    assert f"wrote {tmp_path / 'digits'}.csv / .json / .png" in capsys.readouterr().out
    for suffix in ("csv", "json", "png"):
        assert (tmp_path / f"digits.{suffix}").stat().st_size > 0
    assert {p: p.stat().st_mtime_ns for p in digits.RESULTS.glob("digits.*")} == shipped  # the package's stay


def test_plot_names_the_compiler(tmp_path):
    rows = [{"method": "unmerged", "r": 0, "accuracy": 0.96, "images_per_s": 900.0},
            {"method": "tome", "r": 16, "accuracy": 0.95, "images_per_s": 1000.0}]
    eager = digits.pareto_plot(rows, tmp_path / "eager.png", compiler="eager").axes[0].get_xlabel()
    inductor = digits.pareto_plot(rows, tmp_path / "inductor.png").axes[0].get_xlabel()
    assert eager == "images/s (eager PyTorch, not compiled, CPU)"  # it read "compiled" under --compiler eager
    assert inductor == "images/s (compiled by Inductor, CPU)"
