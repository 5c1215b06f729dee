"""The ``tomec`` command as a user runs it (``python -m tomec.cli`` in a fresh process): a mistake is
one line on stderr (``tomec: error: ...``) and exit status 2, ``--debug`` or ``TOMEC_DEBUG=1`` shows
the traceback; help exits 0; every subcommand takes the shared merge arguments.

Each process pays for importing torch (seconds), so the commands of the selected tests start
together at the first test, a few at a time, and each test reads its own results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from tomec import cli

HERE = Path(__file__).name
FOLDER_CLASSES = 3  # test_vit's head predicts 1000
EVAL = ["--model", "test_vit", "--compiler", "eager", "--batch", "2", "--workers", "0", "--limit", "2"]

# test -> {run name: (arguments, extra environment)}; "{folder}" and "{tmp}" are filled in.
COMMANDS: dict[str, dict[str, tuple[list[str], dict[str, str]]]] = {
    "test_vis_depths_are_checked_against_the_blocks": {
        "depth_7": (["vis", "--model", "test_vit", "--depths", "3,7", "--compiler", "eager",
                     "--out", "{tmp}/vis.png"], {}),
    },
    "test_eval_refuses_limit_0_and_debug_shows_the_traceback": {
        "limit_0": (["eval", "--data", "{folder}", "--model", "test_vit", "--limit", "0"], {}),
        "flag": (["eval", "--data", "{folder}", "--debug", "--model", "test_vit", "--limit", "0"], {}),
        "env": (["eval", "--data", "{tmp}/nonexistent", "--model", "test_vit"], {"TOMEC_DEBUG": "1"}),
    },
    "test_eval_unwraps_the_backend_error": {
        "too_many": (["eval", "--data", "{folder}", *EVAL, "--r", "5000",
                      "--num-classes", str(FOLDER_CLASSES)], {}),
    },
    "test_eval_warns_when_the_folder_and_the_head_disagree": {
        "warns": (["eval", "--data", "{folder}", *EVAL, "--eager", "--r", "20", "--out", "{tmp}/eval.json"], {}),
    },
    "test_finetune_help_exits_0": {
        "help": (["finetune", "--help"], {}),
    },
    "test_bench_takes_the_merge_arguments": {
        "both": (["bench", "--models", "test_vit", "--keep-ratio", "0.9", "--reduce", "8"], {}),
    },
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for i in range(2 * FOLDER_CLASSES):
        cls = root / f"n{i % FOLDER_CLASSES:08d}"
        cls.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    return root


def _tomec(args: list[str], extra_env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TOMEC_DEBUG"}
    env.update({"OMP_NUM_THREADS": "1", **extra_env})
    return subprocess.run([sys.executable, "-m", "tomec.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def runs(request, folder, tmp_path_factory) -> Iterator[dict[str, Future]]:
    """Every command of this module's selected tests, started together (four processes at a time)."""
    tmp = tmp_path_factory.mktemp("cli")
    selected = {item.originalname for item in request.session.items if Path(str(item.path)).name == HERE}
    pool = ThreadPoolExecutor(max_workers=4)
    futures = {}
    for test, commands in COMMANDS.items():
        if test not in selected:
            continue
        for name, (args, env) in commands.items():
            args = [a.format(folder=folder, tmp=tmp) for a in args]
            futures[f"{test}/{name}"] = pool.submit(_tomec, args, env, tmp)
    futures["tmp"] = tmp  # the commands' working directory
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)  # no process outlives the module


def _result(runs: dict, request, name: str) -> subprocess.CompletedProcess:
    return runs[f"{request.node.originalname}/{name}"].result()


def _one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 and exactly one stderr line, ``tomec: error: ...``, holding every one of ``words``."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tomec: error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0]
    return lines[0]


def _traceback(proc: subprocess.CompletedProcess, error: str, *words: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(error), last
    for word in words:
        assert word in last


def test_vis_depths_are_checked_against_the_blocks(runs, request):
    # test_vit has 6 blocks: a depth is 1..6 (it drew "after block 7"; 0 was a TypeError: test_vis.py).
    _one_error_line(_result(runs, request, "depth_7"), "--depths 7", "test_vit has 6 blocks", "1..6")
    assert not (runs["tmp"] / "vis.png").exists()


def test_eval_refuses_limit_0_and_debug_shows_the_traceback(runs, request):
    _one_error_line(_result(runs, request, "limit_0"), "--limit", "at least 1", "got 0")  # was ZeroDivisionError
    _traceback(_result(runs, request, "flag"), "tomec.errors.ConfigError", "--limit")
    _traceback(_result(runs, request, "env"), "FileNotFoundError", "nonexistent")


def _in_process(argv: list[str], capsys, monkeypatch) -> str:
    """``tomec ARGV`` in this process (torch is imported already): the same handler as the command,
    exit status 2 and exactly one stderr line; returns it."""
    monkeypatch.delenv("TOMEC_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv, exit_on_error=True)
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tomec: error: "), err[-3000:]
    return lines[0]


def test_user_errors_are_one_line(capsys, monkeypatch, tmp_path):
    assert "unknown model 'nosuchmodel'" in _in_process(["flops", "--model", "nosuchmodel", "--r", "8"],
                                                         capsys, monkeypatch)
    assert "ResNet" in _in_process(["flops", "--model", "resnet18", "--r", "8"], capsys, monkeypatch)
    missing = tmp_path / "nonexistent"
    line = _in_process(["eval", "--data", str(missing), "--model", "test_vit", "--r", "8"], capsys, monkeypatch)
    assert str(missing) in line and "image folder" in line
    assert "--option takes name=value" in _in_process(["flops", "--option", "margin"], capsys, monkeypatch)
    assert "'1,a'" in _in_process(["flops", "--schedule", "1,a"], capsys, monkeypatch)
    assert "neither a file nor JSON" in _in_process(
        ["calibrate", "--model", "digits", "--thresholds", str(tmp_path / "none.json")], capsys, monkeypatch)
    with pytest.raises(RuntimeError, match="Unknown model"):  # Python callers get the exception
        cli.main(["flops", "--model", "nosuchmodel", "--r", "8"])


def test_eval_unwraps_the_backend_error(runs, request):
    # The schedule fails when torch.compile calls the backend: BackendCompilerFailed wraps the
    # ScheduleError, and the line is tomec's message.
    line = _one_error_line(_result(runs, request, "too_many"), "r=5000", "remove more tokens than exist")
    assert "BackendCompilerFailed" not in line and "backend=" not in line


def test_eval_warns_when_the_folder_and_the_head_disagree(runs, request):
    proc = _result(runs, request, "warns")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("tomec: warning: ")]
    assert len(ours) == 1 and "ClassCountWarning" not in proc.stderr, proc.stderr[-3000:]  # one line
    assert f"has {FOLDER_CLASSES} classes but test_vit predicts 1000" in ours[0]
    assert json.loads((runs["tmp"] / "eval.json").read_text())["images"] == 2


def test_finetune_help_exits_0(runs, request):
    proc = _result(runs, request, "help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: tomec finetune")
    for what in ("dtem", "diffrate", "ltmp"):
        assert what in proc.stdout


@pytest.mark.parametrize("what", ["dtem", "diffrate", "ltmp"])
def test_finetune_examples_are_named_by_their_command(what, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", what, "--help", "--debug"])  # --debug: accepted by every subcommand
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: tomec finetune {what} ")


def test_bench_takes_the_merge_arguments(runs, request, monkeypatch):
    _one_error_line(_result(runs, request, "both"), "--r and --schedule/--keep-ratio")

    from tomec import throughput
    from tomec.schedule import keep_ratio

    calls = []
    monkeypatch.setattr(throughput, "run", lambda *a, **k: calls.append((a, k)))
    cli.main(["bench", "--models", "test_vit", "--schedule", "1,1,1,1,1,1", "--option", "prop_attn=false"])
    (models, methods, rs, batches, *_), options = calls.pop()
    assert (models, methods, rs, batches) == (["test_vit"], ["tome"], [None], [16])
    assert options["schedule"] == [1] * 6 and options["prop_attn"] is False
    cli.main(["bench", "--methods", "tome,pitome", "--reduce", "8,16", "--inflect", "0"])
    (models, methods, rs, _, _, _, _, _, inflect, *_), options = calls.pop()
    assert (models, methods, rs, inflect) == (["deit_small_patch16_224"], ["tome", "pitome"], [8, 16], 0.0)
    assert options["schedule"] is None
    cli.main(["bench", "--method", "pitome", "--keep-ratio", "0.9"])
    (_, methods, rs, *_), options = calls.pop()
    assert (methods, rs) == (["pitome"], [None]) and options["schedule"] == keep_ratio(0.9)
    cli.main(["bench", "--preset", "pitome/deit_small"])
    (models, methods, rs, *_), options = calls.pop()
    assert (models, methods, rs) == (["deit_small_patch16_224"], ["pitome"], [None])
    assert options["prop_attn"] is False and options["schedule"] == keep_ratio(0.925)
    cli.main(["bench"])  # the defaults of before
    (models, methods, rs, *_), options = calls.pop()
    assert (models, methods, rs, options["schedule"]) == (["deit_small_patch16_224"], ["tome"], [156], None)


def test_error_message_reads_through_backend_compiler_failed():
    import torch

    from tomec.errors import ScheduleError

    inner = ScheduleError("r=5000 asks for too much\n(the numbers)")
    wrapped = torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, inner, None)
    assert cli.error_message(wrapped) == "r=5000 asks for too much (the numbers)"
    assert cli.error_message(KeyError("a bug")) is None  # a bug keeps its traceback
