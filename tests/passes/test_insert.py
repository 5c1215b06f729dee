"""The insertion pass: one step call per merging block, plain option values and learned tensors as
buffers in the graph, the log(size) bias on every later attention."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import images, make_model, trace
from tomec import methods, ops
from tomec.config import TomecConfig
from tomec.passes import rewrite


def _rewritten(method, **options):
    model = make_model("test_vit", depth=4)
    x = images("test_vit", 2)
    gm, inputs = trace(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DTEM's random heads
        config = TomecConfig(method=method, compiler="eager", **options)
    result = rewrite(gm, inputs, config)
    return result, model, x


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("method", ["tome", "pitome", "mctf", "dtem"])
def test_one_step_per_merging_block_with_plain_options(method):
    options = {"method_options": {"one_step_ahead": False}} if method == "mctf" else {}
    result, _, _ = _rewritten(method, r=24, **options)
    steps = _calls(result.gm, methods.merge_step)
    assert len(steps) == sum(1 for r in result.plan.schedule if r > 0) == 4
    for node in steps:
        # the options FX writes into the graph's code: plain values, never a typed object or a tensor
        assert isinstance(node.kwargs["options"], dict)
        assert all(isinstance(v, (bool, int, float, type(None))) for v in node.kwargs["options"].values())
    assert "merge_step" in result.gm.code


def test_learned_tensors_are_buffers_read_by_get_attr():
    result, _, _ = _rewritten("dtem", r=24)
    for node in _calls(result.gm, methods.merge_step):
        params = node.kwargs["params"]
        assert set(params) == {"weight", "bias"}
        assert all(p.op == "get_attr" for p in params.values())
        assert isinstance(getattr(result.gm, params["weight"].target), torch.Tensor)


def test_every_attention_after_the_first_merge_gets_the_size_bias():
    """Schedule [8, 0, 8, 8]: blocks 1-3 see merged tokens; blocks 1 and 2 read the sizes after
    block 0 (one bias node), block 3 those after block 2's merge (a second one)."""
    result, _, _ = _rewritten("tome", schedule=[8, 0, 8, 8])
    biases = _calls(result.gm, ops.log_size_bias)
    assert len(biases) == 2
    assert [len(b.users) for b in biases] == [2, 1]  # each bias feeds its blocks' attentions


def test_one_step_ahead_inserts_the_ahead_step_and_drops_the_unmerged_branch():
    result, _, _ = _rewritten("mctf", r=24)
    assert len(_calls(result.gm, methods.merge_step_ahead)) == 3  # block 0 is left alone
    assert len(_calls(result.gm, ops.apply_attention)) == 3
    assert not _calls(result.gm, methods.merge_step)
