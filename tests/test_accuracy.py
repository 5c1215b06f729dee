"""``tomec eval``: top-1/top-5 on a generated ImageNet-style folder, single process and through
``torchrun`` with two gloo processes on CPU, every image counted exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tomec.evaluate import ExactDistributedSampler, evaluate

NUM_IMAGES = 31  # odd: DistributedSampler would pad a duplicate
NUM_CLASSES = 7  # random weights then hit top-1 and top-5 often enough for counts to mean something


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        cls = root / f"n{i % NUM_CLASSES:08d}"
        cls.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (180, 200, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    return root


def test_exact_sampler_partitions_without_padding():
    for n, world in ((31, 2), (5, 8), (64, 4)):
        shares = [list(ExactDistributedSampler(range(n), world, rank)) for rank in range(world)]
        assert sorted(i for share in shares for i in share) == list(range(n))
        assert [len(ExactDistributedSampler(range(n), world, rank)) for rank in range(world)] == [len(s) for s in shares]


def test_single_process(folder):
    result = evaluate(str(folder), "test_vit", batch_size=1, workers=0, compiler="eager",
                      num_classes=NUM_CLASSES, method="tome", r=40)
    assert result["images"] == NUM_IMAGES and result["world_size"] == 1
    assert result["schedule"] and sum(result["schedule"]) == 40
    for which in ("unmerged", "merged"):
        assert 0.0 <= result[which]["top1"] <= result[which]["top5"] <= 1.0


def _counts(result: dict) -> tuple:
    n = result["images"]
    return n, tuple(round(result[w][k] * n) for w in ("unmerged", "merged") for k in ("top1", "top5"))


def _torchrun(folder: Path, nproc: int, out: Path, module: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same float arithmetic in both runs
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", module, "--data", str(folder), "--model", "test_vit", "--method", "tome",
         "--reduce", "40", "--batch", "1", "--workers", "0", "--compiler", "eager",
         "--num-classes", str(NUM_CLASSES), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_torchrun_two_gloo_processes_count_every_image_once(folder, tmp_path):
    # The library's module and the benchmark script's name for it (the README gives both) run the same.
    single = _torchrun(folder, 1, tmp_path / "single.json", "tomec.bench.accuracy")
    dist = _torchrun(folder, 2, tmp_path / "dist.json", "tomec.evaluate")
    assert (single["world_size"], dist["world_size"]) == (1, 2)
    assert dist["images"] == NUM_IMAGES
    # Batch size 1 and one thread: every image is computed alike in both runs, so counts match exactly.
    assert _counts(dist) == _counts(single)
    assert 0 < _counts(single)[1][0] < NUM_IMAGES  # the counts are not trivially 0 or all


def test_eval_refuses_bad_method_clearly(folder):
    with pytest.raises(Exception, match="unknown method"):
        evaluate(str(folder), "test_vit", workers=0, num_classes=NUM_CLASSES, method="nope", r=8)


def test_eval_refuses_a_head_smaller_than_the_folder(folder):
    with pytest.raises(ValueError, match="7 classes but test_vit predicts 5"):
        evaluate(str(folder), "test_vit", workers=0, num_classes=5, method="tome", r=8)


def test_eval_takes_a_preset(folder, tmp_path, capsys):
    from tomec import evaluate as evaluation

    out = tmp_path / "preset.json"
    evaluation.main(["--data", str(folder), "--model", "deit_tiny_patch16_224", "--preset", "mctf/deit_tiny",
                   "--batch", "2", "--workers", "0", "--compiler", "eager", "--limit", "4",
                   "--num-classes", str(NUM_CLASSES), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["schedule"] == [0] + [16] * 11 and result["images"] == 4


def test_eval_checks_its_arguments_first(folder, tmp_path):
    from tomec.errors import ConfigError

    with pytest.raises(ConfigError, match="limit must be at least 1 image, got 0"):  # was ZeroDivisionError
        evaluate(str(folder), "test_vit", workers=0, limit=0, num_classes=NUM_CLASSES, method="tome", r=8)
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        evaluate(str(tmp_path / "nonexistent"), "test_vit", workers=0, method="tome", r=8)


def test_eval_warns_when_the_folder_has_fewer_classes_than_the_head(folder):
    from tomec.evaluate import ClassCountWarning

    with pytest.warns(ClassCountWarning, match="7 classes but test_vit predicts 1000"):
        result = evaluate(str(folder), "test_vit", batch_size=1, workers=0, limit=1, compile_merged=False,
                          method="tome", r=40)
    assert result["images"] == 1
