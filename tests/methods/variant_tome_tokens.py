"""A method added in one file: ToMe's matching on the block's tokens instead of its keys (the metric
ablation of the ToMe paper). In ``tomec/methods/`` it would register on import; the test imports it."""

from __future__ import annotations

from dataclasses import dataclass

from tomec.methods.core import MatchInput, MatchResult, Method, Options, check_bool, register
from tomec.ops import bipartite_match


@dataclass(frozen=True)
class TomeTokensOptions(Options):
    """``normalize``: match on the tokens' layer-normed values (False: the raw residual stream)."""

    method = "tome_tokens"
    normalize: bool = False

    def __post_init__(self) -> None:
        check_bool("tome_tokens", "normalize", self.normalize)


def _match(inp: MatchInput, options: TomeTokensOptions) -> MatchResult:
    metric = inp.x
    if options.normalize:
        metric = (metric - metric.mean(-1, keepdim=True)) / metric.std(-1, keepdim=True)
    return MatchResult(bipartite_match(metric, inp.r, inp.protected, impl=inp.impl))


METHOD = register(Method(name="tome_tokens", options=TomeTokensOptions, match=_match))
