"""What every ``tomec`` command line shares: the merge arguments, their parsing, ``--debug``, and the
one-line error handling (:func:`run_command`).

A module of its own so that each subcommand's module (:mod:`tomec.vis`, :mod:`tomec.evaluate`,
:mod:`tomec.throughput`, :mod:`tomec.digits`, ...) and the benchmark scripts under ``bench/`` take
these from here, and :mod:`tomec.cli`, which imports the subcommands, is imported by none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

from . import presets
from .errors import ConfigError, TomecError
from .schedule import keep_ratio

__all__ = [
    "DEFAULT_MODEL", "parse_options", "add_debug_argument", "add_sweep_arguments", "add_merge_arguments",
    "parse_integers", "merge_kwargs", "merge_sweep", "error_message", "run_command",
]

DEFAULT_MODEL = "deit_small_patch16_224"


def parse_options(pairs: Optional[list[str]]) -> dict[str, Any]:
    """``["bsm_first=false", "margin=0.5"]`` -> ``{"bsm_first": False, "margin": 0.5}`` (JSON values,
    or the raw string where the value is not JSON)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--option takes name=value, got {pair!r}")
        name, value = pair.split("=", 1)
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """``--debug``: listed in every subcommand's help; :func:`run_command` takes it off the command
    line before a subcommand parses it."""
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also TOMEC_DEBUG=1)")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared merge arguments for a command that sweeps methods and totals (``tomec bench``):
    ``--method``/``--methods`` and ``--r``/``--reduce`` take comma-separated lists; the rest as
    :func:`add_merge_arguments`."""
    parser.add_argument("--method", "--methods", dest="method", default=None,
                        help="comma-separated methods (default: tome)")
    parser.add_argument("--r", "--reduce", dest="r", default=None,
                        help="comma-separated totals, e.g. 0,52,104,156 (default: 156 unless --schedule, "
                        "--keep-ratio or --preset gives the schedule)")
    _add_schedule_arguments(parser)


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The schedule and method arguments every subcommand shares."""
    parser.add_argument("--method", default=None, help="default: tome")
    # --reduce: torchrun's own parser reads a bare --r as an ambiguous abbreviation of its options.
    parser.add_argument("--r", "--reduce", dest="r", type=int, default=None,
                        help="tokens removed in total (--reduce under torchrun)")
    _add_schedule_arguments(parser)


def _add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inflect", type=float, default=-0.5)
    parser.add_argument("--schedule", default=None, help="per-block counts, e.g. 8,8,8,...")
    parser.add_argument("--keep-ratio", type=float, default=None, help="PiToMe's kept ratio per block")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a method option or backend setting (repeatable), e.g. bsm_first=false")
    parser.add_argument("--preset", default=None, metavar="METHOD/MODEL",
                        help="a published setting (tomec.presets), e.g. mctf/deit_small; "
                        "--option adds what it requires (heads=..., counts=...)")


def parse_integers(text: str, flag: str) -> list[int]:
    """``"8,8,4"`` -> ``[8, 8, 4]``; anything else is a ``ConfigError`` naming ``flag``."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


def merge_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``tomec.backend``-style keyword arguments from the shared arguments. Where the command has a
    ``--model`` left unset (None), it becomes the preset's model, or :data:`DEFAULT_MODEL`."""
    if getattr(args, "preset", None):
        method, _, model = args.preset.partition("/")
        if args.r is not None or args.schedule or args.keep_ratio is not None or args.method is not None:
            raise ConfigError(
                f"--preset {args.preset} sets the method and the schedule; drop --method/--r/--schedule/--keep-ratio"
            )
        kwargs = presets.get(method, model, **parse_options(args.option))
        if getattr(args, "model", "") is None:  # the preset's own model unless one is given
            args.model = presets.timm_model(presets.find(method, model).model)
        return kwargs
    schedule = None
    if args.schedule:
        schedule = parse_integers(args.schedule, "--schedule")
    if args.keep_ratio is not None:
        schedule = keep_ratio(args.keep_ratio)
    if getattr(args, "model", "") is None:
        args.model = DEFAULT_MODEL
    return dict(method=args.method or "tome", r=args.r, inflect=args.inflect, schedule=schedule,
                **parse_options(args.option))


def merge_sweep(
    args: argparse.Namespace, default_r: int,
) -> tuple[list[str], list[Optional[int]], dict[str, Any]]:
    """Methods, totals and the other ``tomec.backend`` keyword arguments (inflect, schedule, options)
    from :func:`add_sweep_arguments`. ``--schedule``, ``--keep-ratio`` and ``--preset`` give one
    schedule (the totals are ``[None]``); otherwise ``--r`` (default ``default_r``)."""
    single = argparse.Namespace(**vars(args))
    single.method = None if args.method is None else "tome"
    single.r = None if args.r is None else 0
    if getattr(args, "models", "") is None:
        single.model = None  # merge_kwargs names it: the preset's model, or the default
    if getattr(args, "preset", None):
        kwargs = merge_kwargs(single)  # refuses --method/--r beside the preset
        if getattr(args, "models", "") is None:
            args.models = single.model
        kwargs.setdefault("inflect", args.inflect)
        return [kwargs.pop("method")], [kwargs.pop("r", None)], kwargs
    methods = [m.strip() for m in (args.method or "tome").split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--method takes comma-separated method names, got {args.method!r}")
    has_schedule = bool(args.schedule) or args.keep_ratio is not None
    if args.r is not None and has_schedule:
        raise ConfigError("--r and --schedule/--keep-ratio both give the schedule: give one")
    rs: list[Optional[int]] = [None] if has_schedule else [default_r]
    if args.r is not None:
        rs = list(parse_integers(args.r, "--r"))
        if not rs:
            raise ConfigError(f"--r takes comma-separated integers, got {args.r!r}")
    single.r = None
    kwargs = merge_kwargs(single)
    if getattr(args, "models", "") is None:
        args.models = single.model
    del kwargs["method"], kwargs["r"]
    return methods, rs, kwargs


_UNKNOWN_MODEL = re.compile(r"^Unknown model \((.*)\)$")  # timm.create_model's message


def error_message(exc: Optional[BaseException]) -> Optional[str]:
    """The one line ``tomec`` prints for an error that is the user's to fix, or None for any other
    (a bug: the traceback stays). Looks through ``torch.compile``'s ``BackendCompilerFailed``
    (``.inner_exception``) and explicit ``raise ... from`` causes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TomecError):
            return _one_line(str(exc)) or type(exc).__name__
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
            if exc.filename is not None and exc.strerror:
                return f"{exc.strerror}: {exc.filename}"
            return _one_line(str(exc))
        if isinstance(exc, RuntimeError) and _UNKNOWN_MODEL.match(str(exc)):
            name = _UNKNOWN_MODEL.match(str(exc)).group(1)
            return f"unknown model {name!r}: not a timm model name (timm.list_models() lists them)"
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return None


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """For the duration: warnings of tomec's own categories (a ``Warning`` subclass defined in a
    ``tomec`` module, e.g. :class:`tomec.evaluate.ClassCountWarning`) print as one line,
    ``tomec: warning: ...``; every other warning keeps Python's format."""
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if getattr(category, "__module__", "").split(".")[0] == "tomec":
            return f"tomec: warning: {_one_line(str(message))}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = default


def run_command(
    command: Callable[[list[str]], Any], argv: Optional[Sequence[str]] = None, *,
    exit_on_error: Optional[bool] = None,
) -> None:
    """Run ``command(argv)`` (a subcommand's ``main``) as a command line.

    ``exit_on_error`` (default: True for a command line, ``argv`` None; False when Python code
    passes ``argv``): an error that is the user's to fix (:func:`error_message`) prints one line,
    ``tomec: error: ...``, on stderr and exits with status 2; with ``--debug`` (anywhere in
    ``argv``; it is taken off) or ``TOMEC_DEBUG=1`` it propagates with its traceback. Errors that
    are not the user's (bugs) always propagate.
    """
    if exit_on_error is None:
        exit_on_error = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TOMEC_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    argv = [a for a in argv if a != "--debug"]
    if not exit_on_error or debug:
        command(argv)
        return
    try:
        with _one_line_warnings():
            command(argv)
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("message"): a usage error of ours
            print(f"tomec: error: {_one_line(e.code)}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except Exception as e:  # noqa: BLE001 -- one line for the user's errors, the traceback for the rest
        message = error_message(e)
        if message is None:
            raise
        print(f"tomec: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
