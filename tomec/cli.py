"""The ``tomec`` command: ``bench``, ``flops``, ``eval``, ``vis``, ``digits``, ``calibrate``,
``finetune``.

Each subcommand is a thin front end over a documented function: :func:`tomec.bench.throughput.run`,
:func:`tomec.flops.flops_report`, :func:`tomec.bench.accuracy.evaluate`, :func:`tomec.vis.render`,
:func:`tomec.bench.digits.study`, :func:`tomec.calibrate.calibrate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional


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


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The schedule and method arguments every subcommand shares."""
    parser.add_argument("--method", default=None, help="default: tome")
    # --reduce: torchrun's own parser reads a bare --r as an ambiguous abbreviation of its options.
    parser.add_argument("--r", "--reduce", dest="r", type=int, default=None,
                        help="tokens removed in total (--reduce under torchrun)")
    parser.add_argument("--inflect", type=float, default=-0.5)
    parser.add_argument("--schedule", default=None, help="per-block counts, e.g. 8,8,8,...")
    parser.add_argument("--keep-ratio", type=float, default=None, help="PiToMe's kept ratio per block")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a method option (repeatable), e.g. bsm_first=false")
    parser.add_argument("--preset", default=None, metavar="METHOD/MODEL",
                        help="a published setting (tomec.presets), e.g. mctf/deit_small; "
                        "--option adds what it requires (heads=..., counts=...)")


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
        schedule = [int(v) for v in args.schedule.split(",")]
    if args.keep_ratio is not None:
        schedule = keep_ratio(args.keep_ratio)
    if getattr(args, "model", "") is None:
        args.model = DEFAULT_MODEL
    return dict(method=args.method or "tome", r=args.r, inflect=args.inflect, schedule=schedule,
                **parse_options(args.option))


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
          f"patch embedding {report['patch_macs'] / 1e9:.3f})")
    print(f"ideal speedup: {report['ideal_speedup']:.3f}x")


def _calibrate(args: argparse.Namespace) -> None:
    """LTMP thresholds -> a static per-block schedule (``counts=`` of method "ltmp")."""
    from pathlib import Path

    import torch

    from .calibrate import calibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.thresholds
    thresholds = json.loads(Path(text).read_text()) if Path(text).is_file() else json.loads(text)
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


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tomec", description="token merging for Vision Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="throughput against the baselines (bench/throughput.py)", add_help=False)
    flops = sub.add_parser("flops", help="schedule, tokens and MACs per block, without running the model")
    flops.add_argument("--model", default=None, help=f"a timm name (default: {DEFAULT_MODEL}, or the preset's)")
    add_merge_arguments(flops)
    flops.add_argument("--json", action="store_true")
    sub.add_parser("eval", help="top-1/top-5 on an ImageNet-style folder (bench/accuracy.py)", add_help=False)
    sub.add_parser("vis", help="which patches merged, drawn on an image", add_help=False)
    sub.add_parser("digits", help="the offline study on scikit-learn's digits", add_help=False)
    tune = sub.add_parser("finetune", help="offline training on the digits data: dtem heads, "
                          "a diffrate schedule search, ltmp thresholds", add_help=False)
    tune.add_argument("what", choices=sorted(_FINETUNE))
    cal = sub.add_parser("calibrate", help="LTMP: thresholds -> static per-block counts (JSON)")
    cal.add_argument("--model", required=True, help="a timm name (random weights, generated images) or 'digits'")
    cal.add_argument("--thresholds", required=True,
                     help='JSON file or text: {"merge": [per block], "prune": [per block]}')
    cal.add_argument("--out", default=None, help="write the schedule JSON here (for counts=)")
    cal.add_argument("--images", type=int, default=None, help="calibrate on the first N images")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--threads", type=int, default=None)
    cal.add_argument("--quiet", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.command == "finetune":
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


if __name__ == "__main__":
    main()
