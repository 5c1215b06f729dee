"""``tomec bench``: a small run end to end (rows, ratios, files); no timing is asserted."""

from __future__ import annotations

import csv
import json

import pytest

from tomec.bench import throughput


@pytest.mark.slow
def test_bench_writes_rows_and_files(tmp_path, capsys):
    throughput.main(["--models", "test_vit", "--methods", "tome", "--r", "40", "--batch", "2",
                     "--device", "cpu", "--rounds", "2", "--reps", "1", "--threads", "1",
                     "--out", str(tmp_path), "--tag", "smoke"])
    out = capsys.readouterr().out
    assert "1 threads" in out
    rows = json.loads((tmp_path / "throughput-smoke.json").read_text())
    meta, rows = rows["meta"], rows["rows"]
    assert meta["torch"] and meta["threads"] == 1
    assert [r["provider"] for r in rows] == list(throughput.PROVIDERS)
    by = {r["provider"]: r for r in rows}
    for row in rows:
        assert row["images_per_s"] > 0 and row["compile_s"] > 0
        assert row["images_per_s_p20"] <= row["images_per_s"] <= row["images_per_s_p80"]
        assert row[f"speedup_vs_{row['provider']}"] == pytest.approx(1.0)
        speedup = by["inductor"]["ms_per_batch"] / row["ms_per_batch"]
        assert row["speedup_vs_inductor"] == pytest.approx(speedup)
    assert "share_of_ideal" not in by["inductor"] and "share_of_ideal" not in by["eager"]
    assert by["tomec"]["share_of_ideal"] == pytest.approx(by["tomec"]["speedup_vs_inductor"] / by["tomec"]["ideal_speedup"])
    assert by["tomec"]["gmacs_per_image"] < by["inductor"]["gmacs_per_image"]
    assert json.loads(by["tomec"]["schedule"]) == [10, 8, 7, 6, 5, 4]
    with open(tmp_path / "throughput-smoke.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "throughput-smoke.png").stat().st_size > 0


def test_unknown_provider_is_refused():
    with pytest.raises(ValueError, match="unknown provider 'jit'"):
        throughput.build_providers(None, "tome", 8, ["jit"])


def test_merged_providers_take_a_schedule():
    # tomec bench --schedule / --keep-ratio / --preset: r=None, the schedule in the options.
    import torch

    from tomec import reference
    from tomec.schedule import keep_ratio

    from .helpers import images, make_model

    model = make_model("test_vit")
    fns, backends = throughput.build_providers(model, "tome", None, ["reference", "tomec"], schedule=[1] * 6)
    with torch.no_grad():
        fns["reference"](images("test_vit", 1))
    assert reference.state(fns["reference"]).schedule == [1] * 6
    assert list(backends["tomec"].config.schedule) == [1] * 6
    _, backends = throughput.build_providers(model, "pitome", None, ["tomec"], schedule=keep_ratio(0.9))
    assert backends["tomec"].config.schedule == keep_ratio(0.9)


def test_a_row_without_r_counts_the_schedule():
    rows = throughput.measure("test_vit", "tome", None, 1, __import__("torch").float32, "cpu", rounds=1, reps=1,
                              providers=("eager", "reference"), schedule=[1] * 6)
    assert [(r["provider"], r["r"], json.loads(r["schedule"])) for r in rows] == [
        ("eager", 6, [1] * 6), ("reference", 6, [1] * 6)]
