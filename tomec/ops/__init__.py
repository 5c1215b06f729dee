"""The op layer: the token-merging primitives every method shares, as functions of tensors.

Every method ends in the same representation, the *destination map*: ``dest[b, i]`` is the output slot
of token ``i`` (``-1``: dropped). :func:`merge` applies any destination map; :func:`bipartite_match`
is the A/B matching several methods run on their own metric. Each op takes ``impl=``: ``"torch"`` is
the plain-PyTorch semantic reference (used on CPU, and traced by Inductor there); ``"triton"`` runs
the fused kernels of ``tomec.kernels`` (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``"auto"`` picks
Triton for CUDA tensors. All ops are free of Python loops over tokens, host synchronization and
data-dependent shapes, so Dynamo/Inductor trace them whole.

A method's own ops live with the method (``tomec.methods.<name>``) and are re-exported here by name
(``tomec.ops.pitome_match``), resolved on first access: the methods import this layer, so importing
them from here eagerly would be a cycle.

Shapes: ``B`` batch, ``N`` tokens in, ``N_out`` tokens out, ``C`` channels, ``H`` heads, ``d`` head
width, ``N0`` tokens entering the first block.
"""

import importlib

from .attention import (
    apply_attention, attention, attention_extra_dim, attention_flex, attention_probs, attention_received, combine_masks,
    log_size_bias,
)
from .bipartite import best_partner, bipartite_match, check_metric, check_protected, cosine, key_metric, scoring_metric
from .common import IMPLS, SUPPORTED_DTYPES, check_dtype, resolve_impl
from .merge import (
    MERGE_MODES, compose_source, merge, merge_attention, merge_dense, size_weighted_mean, size_weighted_pool,
)

# method op -> the method module that defines it
_METHOD_OPS = {
    "atc_match": "atc", "atc_cluster": "atc", "atc_keep_rate_schedule": "atc", "LINKAGES": "atc",
    "atc_default_blocks": "atc", "crossget_match": "crossget", "crossget_importance": "crossget",
    "dct_truncate": "dct", "diffrate_match": "diffrate", "dtem_match": "dtem", "dtem_metric": "dtem",
    "relaxed_topk": "dtem", "soft_merge": "dtem", "fpet_match": "fpet", "fpet_cap": "fpet", "fpet_grid": "fpet",
    "fpet_metric": "fpet", "ltmp_match": "ltmp", "ltmp_prune_cap": "ltmp", "ltmp_threshold_counts": "ltmp",
    "mctf_match": "mctf", "pitome_match": "pitome",
}


def __getattr__(name: str):
    if name in _METHOD_OPS:
        return getattr(importlib.import_module(f"tomec.methods.{_METHOD_OPS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_METHOD_OPS))


__all__ = [
    "SUPPORTED_DTYPES", "IMPLS", "MERGE_MODES", "check_dtype", "resolve_impl", "key_metric", "scoring_metric",
    "cosine", "check_protected", "check_metric", "best_partner", "bipartite_match", "attention_received",
    "attention_probs", "apply_attention", "merge_attention", "merge", "merge_dense", "compose_source",
    "log_size_bias", "combine_masks", "attention", "attention_extra_dim", "attention_flex",
    "size_weighted_mean", "size_weighted_pool", *_METHOD_OPS,
]
