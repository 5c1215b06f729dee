"""The ``tomec`` command: ``bench``, ``flops``, ``eval``, ``vis``, ``digits``, ``calibrate``,
``finetune``.

Each subcommand is a thin front end over a documented function of the library:
:func:`tomec.throughput.run`, :func:`tomec.flops.flops_report`, :func:`tomec.evaluate.evaluate`,
:func:`tomec.vis.render`, :func:`tomec.digits.study`, :func:`tomec.train.ltmp.calibrate`, and the
digits fine-tuning studies (:mod:`tomec.digits_dtem`, :mod:`tomec.digits_diffrate`,
:mod:`tomec.digits_ltmp`). The benchmark scripts under ``bench/`` import the same functions; nothing
here imports them.

A mistake in the command line (tomec's own errors, a missing file or folder, an unknown timm model,
a model tomec cannot merge) is one line on stderr, ``tomec: error: ...``, and exit status 2;
``--debug`` (anywhere on the command line, every subcommand) or ``TOMEC_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import torch

from . import digits, digits_diffrate, digits_dtem, digits_ltmp, evaluate, throughput, vis
from .train.ltmp import calibrate
from .cli_args import (  # noqa: F401 (re-exported: the helpers' old home, tomec.cli.merge_kwargs & co.)
    DEFAULT_MODEL,
    add_debug_argument,
    add_merge_arguments,
    add_sweep_arguments,
    error_message,
    merge_kwargs,
    merge_sweep,
    parse_integers,
    parse_options,
    run_command,
)
from .errors import ConfigError
from .flops import flops_report


def _flops(args: argparse.Namespace) -> None:
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
    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.thresholds
    try:
        thresholds = json.loads(Path(text).read_text()) if Path(text).is_file() else json.loads(text)
    except json.JSONDecodeError as e:
        what = "the file" if Path(text).is_file() else "neither a file nor JSON text"
        raise ConfigError(f"--thresholds {text!r}: {what} ({e})") from None
    if args.model == "digits":
        model = digits.load_trained()
        images = digits.digits_data()[0]  # the training split: the test split stays unseen
    else:
        import timm  # seconds to import: only this branch needs it

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


# The digits fine-tuning studies; the rest of the command line goes to their own parsers (``main``).
_FINETUNE: dict[str, ModuleType] = {"dtem": digits_dtem, "diffrate": digits_diffrate, "ltmp": digits_ltmp}
_FINETUNE_HELP = {
    "dtem": "train DTEM's embedding heads (backbone frozen)",
    "diffrate": "search DiffRate schedules at a MACs target",
    "ltmp": "learn LTMP thresholds, then calibrate them to static counts",
}

# Subcommands that parse the rest of the command line themselves (their module's ``main``, looked up
# when it runs).
_SUBCOMMANDS: dict[str, ModuleType] = {"bench": throughput, "eval": evaluate, "vis": vis, "digits": digits}


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="tomec", description="token merging for Vision Transformers",
                                     epilog="An error is one line (exit status 2); --debug, anywhere "
                                     "on the command line, or TOMEC_DEBUG=1 shows its traceback.")
    add_debug_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="throughput against the baselines (tomec.throughput)", add_help=False)
    flops = sub.add_parser("flops", help="schedule, tokens and MACs per block, without running the model")
    flops.add_argument("--model", default=None, help=f"a timm name (default: {DEFAULT_MODEL}, or the preset's)")
    add_merge_arguments(flops)
    flops.add_argument("--json", action="store_true")
    add_debug_argument(flops)
    sub.add_parser("eval", help="top-1/top-5 on an ImageNet-style folder (tomec.evaluate)", add_help=False)
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
        _FINETUNE[args.what].main(rest)
        return
    if args.command in ("flops", "calibrate") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "calibrate":
        _calibrate(args)
    elif args.command == "flops":
        _flops(args)
    else:
        _SUBCOMMANDS[args.command].main(rest)


def main(argv: Optional[Sequence[str]] = None, *, exit_on_error: Optional[bool] = None) -> None:
    """The ``tomec`` command (see :func:`tomec.cli_args.run_command` for ``exit_on_error``)."""
    run_command(_run, argv, exit_on_error=exit_on_error)


if __name__ == "__main__":
    main()
