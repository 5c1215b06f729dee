"""The ``tomec`` command: ``bench``, ``flops``, ``eval``, ``vis``, ``digits``, ``calibrate``,
``finetune``.

Each subcommand is a thin front end over a documented function: :func:`tomec.bench.throughput.run`,
:func:`tomec.flops.flops_report`, :func:`tomec.bench.accuracy.evaluate`, :func:`tomec.vis.render`,
:func:`tomec.bench.digits.study`, :func:`tomec.calibrate.calibrate`.

A mistake in the command line (tomec's own errors, a missing file or folder, an unknown timm model,
a model tomec cannot merge) is one line on stderr, ``tomec: error: ...``, and exit status 2;
``--debug`` (anywhere on the command line, every subcommand) or ``TOMEC_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence


def parse_options(pairs: list[str]) -> dict[str, Any]:
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


DEFAULT_MODEL = "deit_small_patch16_224"


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """``--debug``: listed in every subcommand's help; :func:`main` takes it off the command line
    before a subcommand parses it."""
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
    from .errors import ConfigError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


def merge_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``tomec.backend``-style keyword arguments from the shared arguments."""
    from .schedule import keep_ratio

    if getattr(args, "preset", None):
        from . import presets
        from .errors import ConfigError

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
    from .errors import ConfigError

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


def _flops(args: argparse.Namespace) -> None:
    from .flops import flops_report

    kwargs = merge_kwargs(args)  # first: a preset names the model
    report = flops_report(args.model, **kwargs)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{args.model} with {report['method']}: {report['protected']} protected tokens, width {report['dim']}")
    print(f"{'block':>5}{'tokens in':>11}{'removed':>9}{'GMACs':>9}")
    for i, (n, r, macs) in enumerate(zip(report["tokens_in"], report["schedule"], report["block_macs"])):
        print(f"{i:>5}{n:>11}{r:>9}{macs / 1e9:>9.3f}")
    print(f"tokens after the last block: {report['tokens_out']}")
    print(f"GMACs per image: {report['macs'] / 1e9:.3f} (unmerged {report['unmerged_macs'] / 1e9:.3f}, "
          f"patch embedding {report['patch_macs'] / 1e9:.3f}, head and the rest {report['other_macs'] / 1e9:.3f})")
    print(f"ideal speedup: {report['ideal_speedup']:.3f}x")


def _calibrate(args: argparse.Namespace) -> None:
    """LTMP thresholds -> a static per-block schedule (``counts=`` of method "ltmp")."""
    import torch

    from .calibrate import calibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.thresholds
    try:
        thresholds = json.loads(Path(text).read_text()) if Path(text).is_file() else json.loads(text)
    except json.JSONDecodeError as e:
        from .errors import ConfigError

        what = "the file" if Path(text).is_file() else "neither a file nor JSON text"
        raise ConfigError(f"--thresholds {text!r}: {what} ({e})") from None
    if args.model == "digits":
        from .bench import digits

        model = digits.load_trained()
        images = digits.digits_data()[0]  # the training split: the test split stays unseen
    else:
        import timm

        torch.manual_seed(args.seed)
        model = timm.create_model(args.model, pretrained=False).eval()
        side = model.patch_embed.img_size
        g = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.images or 8, 3, *side, generator=g)
    if args.images:
        images = images[: args.images]
    result = calibrate(model, thresholds, images, out=args.out, progress=not args.quiet)
    print(json.dumps({"merge": result["merge"], "prune": result["prune"]}))
    print(f"{result['images']} images; removed per block {[m + p for m, p in zip(result['merge'], result['prune'])]}"
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)


# The digits fine-tuning examples; the rest of the command line goes to their own parsers.
_FINETUNE = {
    "dtem": "tomec.bench.finetune_dtem",
    "diffrate": "tomec.bench.finetune_diffrate",
    "ltmp": "tomec.bench.ltmp_digits",
}
_FINETUNE_HELP = {
    "dtem": "train DTEM's embedding heads (backbone frozen)",
    "diffrate": "search DiffRate schedules at a MACs target",
    "ltmp": "learn LTMP thresholds, then calibrate them to static counts",
}


_UNKNOWN_MODEL = re.compile(r"^Unknown model \((.*)\)$")  # timm.create_model's message


def error_message(exc: BaseException) -> Optional[str]:
    """The one line ``tomec`` prints for an error that is the user's to fix, or None for any other
    (a bug: the traceback stays). Looks through ``torch.compile``'s ``BackendCompilerFailed``
    (``.inner_exception``) and explicit ``raise ... from`` causes."""
    from .errors import TomecError

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
    ``tomec`` module, e.g. :class:`tomec.bench.accuracy.ClassCountWarning`) print as one line,
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


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="tomec", description="token merging for Vision Transformers",
                                     epilog="An error is one line (exit status 2); --debug, anywhere "
                                     "on the command line, or TOMEC_DEBUG=1 shows its traceback.")
    add_debug_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="throughput against the baselines (bench/throughput.py)", add_help=False)
    flops = sub.add_parser("flops", help="schedule, tokens and MACs per block, without running the model")
    flops.add_argument("--model", default=None, help=f"a timm name (default: {DEFAULT_MODEL}, or the preset's)")
    add_merge_arguments(flops)
    flops.add_argument("--json", action="store_true")
    add_debug_argument(flops)
    sub.add_parser("eval", help="top-1/top-5 on an ImageNet-style folder (bench/accuracy.py)", add_help=False)
    sub.add_parser("vis", help="which patches merged, drawn on an image", add_help=False)
    sub.add_parser("digits", help="the offline study on scikit-learn's digits", add_help=False)
    # add_help=False: "tomec finetune dtem --help" is the example's own help.
    tune = sub.add_parser(
        "finetune", help="offline training on the digits data: dtem heads, a diffrate schedule search, "
        "ltmp thresholds", add_help=False, usage="tomec finetune {%s} [options]" % ",".join(sorted(_FINETUNE)),
        description="offline training on the digits data; 'tomec finetune dtem --help' (diffrate, ltmp) lists its options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {name:10}{_FINETUNE_HELP[name]}" for name in sorted(_FINETUNE)))
    tune.add_argument("what", nargs="?", choices=sorted(_FINETUNE), help="what to train (below)")
    cal = sub.add_parser("calibrate", help="LTMP: thresholds -> static per-block counts (JSON)")
    cal.add_argument("--model", required=True, help="a timm name (random weights, generated images) or 'digits'")
    cal.add_argument("--thresholds", required=True,
                     help='JSON file or text: {"merge": [per block], "prune": [per block]}')
    cal.add_argument("--out", default=None, help="write the schedule JSON here (for counts=)")
    cal.add_argument("--images", type=int, default=None, help="calibrate on the first N images")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--threads", type=int, default=None)
    cal.add_argument("--quiet", action="store_true")
    add_debug_argument(cal)
    return parser, tune


def _run(argv: list[str]) -> None:
    parser, tune = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "finetune":
        if args.what is None:
            if "-h" in rest or "--help" in rest:
                tune.print_help()
                raise SystemExit(0)
            tune.error("the following arguments are required: what")
        import importlib

        importlib.import_module(_FINETUNE[args.what]).main(rest)
        return
    if args.command in ("flops", "calibrate") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "calibrate":
        _calibrate(args)
    elif args.command == "flops":
        _flops(args)
    elif args.command == "bench":
        from .bench import throughput

        throughput.main(rest)
    elif args.command == "eval":
        from .bench import accuracy

        accuracy.main(rest)
    elif args.command == "vis":
        from . import vis

        vis.main(rest)
    elif args.command == "digits":
        from .bench import digits

        digits.main(rest)


def main(argv: Optional[Sequence[str]] = None, *, exit_on_error: Optional[bool] = None) -> None:
    """The ``tomec`` command (see :func:`run_command` for ``exit_on_error``)."""
    run_command(_run, argv, exit_on_error=exit_on_error)


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

if __name__ == "__main__":
    main()
