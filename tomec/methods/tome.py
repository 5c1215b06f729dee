"""ToMe (ICLR'23): bipartite soft matching on the attention keys (METHODS.md, ToMe).

The matching itself is the shared :func:`tomec.ops.bipartite_match`; ToMe adds nothing to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tomec.ops.bipartite import bipartite_match

from .core import MatchInput, MatchResult, Method, Options, register

__all__ = ["TomeOptions"]


@dataclass(frozen=True)
class TomeOptions(Options):
    """ToMe has no options."""

    method = "tome"


def _match(inp: MatchInput, options: TomeOptions) -> MatchResult:
    return MatchResult(bipartite_match(inp.keys, inp.r, inp.protected, impl=inp.impl))


register(Method(name="tome", options=TomeOptions, match=_match))
