"""Each method's published evaluation setting, one line away.

    fast = torch.compile(model, backend=tomec.backend(**tomec.presets.get("mctf", "deit_small")))

A preset is the setting a paper (or its official code) evaluates a model at: the schedule and the
method options, with the ImageNet-1k top-1 and GFLOPs it reports beside it (``None`` where the
sources we read give none) and what the user must load for that number (trained heads, an adapter,
calibrated counts, fine-tuned weights). :func:`get` returns ``tomec.backend`` keyword arguments;
a preset that needs a trained artifact is an error until it is given (``get("dtem", "deit_small",
heads="heads.pt")``). ``tomec eval --preset mctf/deit_small`` evaluates one on an ImageNet folder.
GFLOPs are multiply-accumulates, as the papers count them. A test holds each preset's schedule to
its reported GFLOPs with ``tomec flops`` where the counts are comparable (ToMe, DiffRate, MCTF);
where a paper counts differently or reports none, ``schedule_gflops`` records tomec's own count,
which the test then only keeps from drifting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError

__all__ = ["Preset", "PRESETS", "get", "find", "available", "MODELS"]

# Short names and the timm models they stand for.
MODELS = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_base": "vit_base_patch16_224",
}

# DiffRate's searched DeiT-S schedule at 2.9 GFLOPs, from the official repository's
# compression_rate.json (tokens kept after pruning and after merging, CLS included).
_DIFFRATE_DEIT_S_29 = {
    "prune_kept": [197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3],
    "merge_kept": [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3],
}


@dataclass(frozen=True)
class Preset:
    """A published setting: backend arguments, the reported numbers, what must be loaded."""

    method: str
    model: str  # short name (MODELS)
    options: dict[str, Any]  # tomec.backend keyword arguments besides method=
    top1: Optional[float]  # reported ImageNet-1k top-1 (%), None: not reported in what we read
    gflops: Optional[float]  # reported GFLOPs (GMACs), None: not reported
    weights: str  # which weights the reported number is for
    source: str  # where the setting and the numbers come from
    requires: tuple[str, ...] = ()  # options the user must give (trained artifacts)
    load: str = ""  # what to load, and how to make it
    note: str = ""
    schedule_gflops: Optional[float] = field(default=None)  # tomec flops of the setting, when no
    # reported figure exists to check it against (None: equal to ``gflops``)

    @property
    def name(self) -> str:
        return f"{self.method}/{self.model}"


def _preset(*args: Any, **kwargs: Any) -> Preset:
    return Preset(*args, **kwargs)


_MCTF = {"schedule": [0] + [16] * 11, "one_step_ahead": True, "tau_sim": 1.0, "tau_info": 20.0,
         "tau_size": 40.0, "bidirectional": True}

PRESETS: tuple[Preset, ...] = (
    _preset(
        "tome", "deit_small", {"schedule": [13] * 12}, 79.36, 2.7, "DeiT-S trained with ToMe (r = 13)",
        "ToMe's DeiT table (METHODS.md: 79.8 -> 79.36 trained with merging; Papers with Code: 79.4 / 2.7)",
    ),
    _preset(
        "tome", "vit_base", {"schedule": [13] * 12}, 82.60, None,
        "off the shelf: timm's AugReg ViT-B/16 (84.57 unmerged)",
        "facebookresearch/ToMe README, off-the-shelf table (r = 13, V100: 309 -> 511 img/s)",
        schedule_gflops=10.37,
    ),
    _preset(
        "pitome", "deit_small", {"schedule": "keep_ratio:0.925", "prop_attn": False}, 79.10, 3.06,
        "off the shelf: timm's DeiT-S (79.89 unmerged)",
        "hchautran/PiToMe scripts/eval_deit.sh (ratio 0.925) and its log eval_ic_deit_small_patch16_224.csv; "
        "prop_attn=False as its ViT code",
        note="the log's FLOP counter counts more than the MACs here (tomec flops: 2.99)",
        schedule_gflops=2.99,
    ),
    _preset(
        "pitome", "deit_base", {"schedule": "keep_ratio:0.925", "prop_attn": False}, 80.54, 11.86,
        "off the shelf: timm's DeiT-B (81.80 unmerged)",
        "hchautran/PiToMe scripts/eval_deit.sh (ratio 0.925) and eval_ic_deit_base_patch16_224.csv",
        schedule_gflops=11.49,
    ),
    _preset(
        "tofu", "deit_small", {"schedule": "keep_ratio:0.925"}, None, None,
        "off the shelf: timm's DeiT-S",
        "hchautran/PiToMe scripts/eval_deit.sh evaluates ToFu at ratio 0.925 (the toolbox's setting)",
        note="no ToFu number for DeiT-S was in the sources read here", schedule_gflops=2.99,
    ),
    _preset(
        "diffrate", "deit_small", {"kept": _DIFFRATE_DEIT_S_29}, 79.54, 2.9,
        "off the shelf (timm's DeiT-S) with the searched schedule; 79.8 after fine-tuning",
        "OpenGVLab/DiffRate README and compression_rate.json (DeiT-S, 2.9 GFLOPs)",
        load="nothing: the searched schedule is in the preset",
    ),
    _preset(
        "mctf", "deit_small", dict(_MCTF), 80.1, 2.6, "MCTF's fine-tuned DeiT-S checkpoint",
        "mlvlab/MCTF README and run/eval_deit_s_mctf.sh (r = 16 at blocks 1-11, one step ahead)",
        load="the official fine-tuned MCTF DeiT-S weights (checkpoint=) for 80.1",
    ),
    _preset(
        "mctf", "deit_tiny", dict(_MCTF), 72.7, 0.71, "MCTF's fine-tuned DeiT-T checkpoint",
        "mlvlab/MCTF README (DeiT-T, r = 16 at blocks 1-11, one step ahead)",
        load="the official fine-tuned MCTF DeiT-T weights (checkpoint=) for 72.7",
    ),
    _preset(
        "ltmp", "deit_small", {"counts": None}, 79.6, 3.0,
        "DeiT-S with thresholds learned at a 60% FLOPs target (backbone frozen)",
        "LTMP (TMLR'23), DeiT-S at reduction target 0.6 (Papers with Code)",
        requires=("counts",),
        load="counts= calibrated from thresholds trained at target 0.6: "
        "tomec.train.ltmp.train_thresholds(model, data, target=0.6), then `tomec calibrate`",
    ),
    _preset(
        "atc", "deit_small", {"keep_rate": 0.9, "linkage": "complete"}, None, None,
        "ATC's fine-tuned DeiT-S checkpoints (official, keep rates 0.25 / 0.5 / 0.7 / 0.9)",
        "JoakimHaurum/ATC README: blocks 3, 6, 9, complete linkage, keep rate 0.9 for DeiT",
        load="the official fine-tuned ATC weights (checkpoint=)",
        note="the paper's DeiT-S accuracies were not in the sources read here", schedule_gflops=3.96,
    ),
    _preset(
        "dtem", "deit_small", {"schedule": [16] * 11 + [10]}, None, None,
        "DeiT-S frozen, with DTEM's decoupled embedding trained",
        "movinghoon/DTEM train.py defaults (--val-reduction 16; ToMe's cap leaves 10 in the last block)",
        requires=("heads",),
        load="heads= trained with tomec.train.dtem.train_heads (or the official embedding modules)",
        note="the abstract reports 79.85 at -37.2% FLOPs, not at this r", schedule_gflops=2.29,
    ),
    _preset(
        "fpet", "vit_base", {"r": 98}, None, None,
        "ViT-B/16 (ImageNet-21k) with FPET's adapter and PEFT modules tuned per VTAB-1k task",
        "kyk120/fpet train.sh: the reduction block 6 of 12 merges every A token (98 of 196)",
        requires=("adapter",),
        load="adapter= trained with tomec.train.fpet.train_adapter (or the official adapter), and the "
        "task's PEFT weights; FPET reports VTAB-1k, not ImageNet",
        schedule_gflops=13.41,
    ),
)


def available() -> list[str]:
    """The presets' names, ``method/model``."""
    return [p.name for p in PRESETS]


def find(method: str, model: str) -> Preset:
    """The preset of ``method`` on ``model`` (short name or timm name); an unknown pair is an
    error that lists the presets."""
    short = {v: k for k, v in MODELS.items()}.get(model, model)
    for p in PRESETS:
        if p.method == str(method).lower() and p.model == short:
            return p
    raise ConfigError(
        f"no preset for method {method!r} on model {model!r}; presets: {', '.join(available())}"
    )


def get(method: str, model: str, **overrides: Any) -> dict[str, Any]:
    """``tomec.backend`` keyword arguments of the preset, with ``overrides`` (the trained artifacts
    it requires, or other backend settings such as ``compiler=``) on top."""
    from .schedule import keep_ratio

    preset = find(method, model)
    missing = [name for name in preset.requires if overrides.get(name) is None]
    if missing:
        raise ConfigError(
            f"preset {preset.name} reports its number with trained {', '.join(missing)}: give "
            f"{', '.join(f'{m}=' for m in missing)} ({preset.load})"
        )
    kwargs: dict[str, Any] = {"method": preset.method, **preset.options}
    schedule = kwargs.get("schedule")
    if isinstance(schedule, str) and schedule.startswith("keep_ratio:"):
        kwargs["schedule"] = keep_ratio(float(schedule.split(":", 1)[1]))
    elif isinstance(schedule, list):
        kwargs["schedule"] = list(schedule)
    kwargs.update(overrides)
    return {k: v for k, v in kwargs.items() if v is not None}


def timm_model(model: str) -> str:
    """The timm name of a preset's short model name."""
    return MODELS.get(model, model)


def table() -> str:
    """The presets as a Markdown table (the README's)."""
    rows = ["| preset | setting | reported top-1 | GFLOPs | for which weights | what to load | source |",
            "|---|---|---|---|---|---|---|"]
    for p in PRESETS:
        setting = ", ".join(f"{k}={_short(v)}" for k, v in p.options.items() if v is not None) or "—"
        top1 = "—" if p.top1 is None else f"{p.top1:.2f}".rstrip("0").rstrip(".")
        gflops = "—" if p.gflops is None else f"{p.gflops:g}"
        rows.append(f"| `{p.name}` | {setting} | {top1} | {gflops} | {p.weights} | "
                    f"{p.load or 'nothing'} | {p.source} |")
    return "\n".join(rows)


def _short(value: Any) -> str:
    if isinstance(value, list) and len(set(value)) <= 2 and len(value) > 4:
        head = value[0]
        rest = value[1:]
        return f"[{head}] + [{rest[0]}] × {len(rest)}" if len(set(rest)) == 1 and head != rest[0] else (
            f"[{value[0]}] × {len(value)}" if len(set(value)) == 1 else str(value))
    if isinstance(value, dict):
        return "the official searched schedule"
    return str(value)
