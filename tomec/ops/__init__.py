"""The op layer: token-merging steps as functions of tensors.

Every method ends in the same representation, the *destination map*: ``dest[b, i]`` is the output slot
of token ``i`` (``-1``: dropped). :func:`merge` applies any destination map; matchers such as
:func:`bipartite_match` produce one. Each op takes ``impl=``: ``"torch"`` is the plain-PyTorch
semantic reference (used on CPU, and traced by Inductor there); ``"triton"`` runs the fused kernels of
``tomec.kernels`` (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``"auto"`` picks Triton for CUDA
tensors. All ops are free of Python loops over tokens, host synchronization and data-dependent
shapes, so Dynamo/Inductor trace them whole.

Shapes: ``B`` batch, ``N`` tokens in, ``N_out`` tokens out, ``C`` channels, ``H`` heads, ``d`` head
width, ``N0`` tokens entering the first block.
"""

from .atc import LINKAGES, atc_cluster, atc_default_blocks, atc_keep_rate_schedule, atc_match
from .attention import (
    apply_attention, attention, attention_extra_dim, attention_flex, attention_probs, attention_received, combine_masks,
    log_size_bias,
)
from .common import IMPLS, SUPPORTED_DTYPES, check_dtype, resolve_impl
from .crossget import crossget_importance, crossget_match
from .dct import dct_truncate
from .dtem import dtem_match, dtem_metric, relaxed_topk, soft_merge
from .fpet import fpet_cap, fpet_grid, fpet_match, fpet_metric
from .ltmp import ltmp_match, ltmp_prune_cap, ltmp_threshold_counts
from .matching import bipartite_match, diffrate_match, key_metric, pitome_match
from .mctf import mctf_match
from .merge import (
    MERGE_MODES, compose_source, merge, merge_attention, merge_dense, size_weighted_mean, size_weighted_pool,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "IMPLS",
    "MERGE_MODES",
    "check_dtype",
    "resolve_impl",
    "key_metric",
    "bipartite_match",
    "pitome_match",
    "diffrate_match",
    "mctf_match",
    "attention_received",
    "attention_probs",
    "apply_attention",
    "merge_attention",
    "atc_match",
    "atc_cluster",
    "atc_keep_rate_schedule",
    "LINKAGES",
    "atc_default_blocks",
    "dtem_match",
    "dtem_metric",
    "relaxed_topk",
    "soft_merge",
    "fpet_match",
    "fpet_cap",
    "fpet_grid",
    "fpet_metric",
    "ltmp_match",
    "ltmp_prune_cap",
    "ltmp_threshold_counts",
    "crossget_match",
    "crossget_importance",
    "dct_truncate",
    "merge",
    "merge_dense",
    "compose_source",
    "log_size_bias",
    "combine_masks",
    "attention",
    "attention_extra_dim",
    "attention_flex",
    "size_weighted_mean",
    "size_weighted_pool",
]
