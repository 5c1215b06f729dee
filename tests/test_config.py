"""The backend's configuration: validated and normalized on construction, methods' options typed."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from tomec import methods
from tomec.config import TomecConfig
from tomec.errors import ConfigError


def test_method_options_become_the_methods_typed_options():
    config = TomecConfig(method="PiToMe", r=8, method_options={"margin": 1})
    assert config.method == "pitome"
    assert config.method_options == methods.PitomeOptions(margin=1.0)
    assert isinstance(config.method_options.margin, float)  # normalized on construction
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method_options.margin = 0.5


def test_a_typed_options_object_is_taken_as_is_and_the_wrong_one_refused():
    options = methods.MctfOptions(tau_info=0)
    assert TomecConfig(method="mctf", r=8, method_options=options).method_options is options
    with pytest.raises(ConfigError, match="method 'tome' takes TomeOptions, got MctfOptions"):
        TomecConfig(method="tome", r=8, method_options=options)


@pytest.mark.parametrize(
    "method,values,message",
    [
        ("pitome", {"margn": 1}, "method 'pitome' has no option 'margn'; its options are: bsm_first, margin"),
        ("tome", {"x": 1}, "method 'tome' has no option 'x'; its options are: none"),
        ("pitome", {"bsm_first": 1}, "pitome: bsm_first must be True or False, got 1"),
        ("tofu", {"prune_blocks": -1}, "tofu: prune_blocks must be a block count >= 0 or None"),
        ("dtem", {"seed": 1.5}, "dtem: seed must be an int >= 0, got 1.5"),
        ("dtem", {"dim": 0}, "dtem: dim must be a positive int or None"),
        ("fpet", {"block": "3"}, "fpet: block must be a block index >= 0 or None"),
        ("atc", {"keep_rate": 0}, r"atc: keep_rate must be a number in \(0, 1\], got 0"),
        ("crossget", {"guided": None}, "crossget: guided must be True or False, got None"),
    ],
)
def test_ill_typed_or_unknown_options_are_errors_naming_them(method, values, message):
    with pytest.raises(ConfigError, match=message):
        methods.get(method).make_options(values)


def test_schedule_sources_are_exclusive():
    with pytest.raises(ConfigError, match="give r= .* or schedule="):
        TomecConfig(method="tome")
    with pytest.raises(ConfigError, match="not both"):
        TomecConfig(method="tome", r=4, schedule=[1, 2])
    counts = {"merge": [1, 1], "prune": [0, 1]}
    with pytest.raises(ConfigError, match="takes its schedule from its options"):
        TomecConfig(method="ltmp", r=4, method_options={"counts": counts})
    assert TomecConfig(method="ltmp", method_options={"counts": counts}).resolve_schedule(2, 17, 1) == [1, 2]


def test_a_methods_advice_is_said_once_when_configured():
    with pytest.warns(UserWarning, match="no trained heads given"):
        config = TomecConfig(method="dtem", r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the typed options themselves warn about nothing
        methods.get("dtem").make_options({})
        methods.core._options_of(methods.get("dtem"), config.method_options.graph_args())


def test_graph_args_leave_out_the_learned_tensors_options():
    options = methods.get("dtem").make_options({"seed": 3})
    assert options.graph_args() == {}
    assert methods.get("mctf").make_options({}).graph_args() == {
        "tau_sim": 1.0, "tau_info": 20.0, "tau_size": 40.0, "bidirectional": True, "one_step_ahead": True}


def test_site_and_reduction_blocks_follow_the_options():
    assert TomecConfig(method="mctf", r=8).site == "ahead"
    assert TomecConfig(method="mctf", r=8, method_options={"one_step_ahead": False}).site == "attention"
    assert TomecConfig(method="dct", r=8).site == "block"
    assert TomecConfig(method="mctf", r=8).resolve_schedule(4, 50, 1)[0] == 0  # block 0 left alone
    assert TomecConfig(method="atc", r=9, method_options={"blocks": [1]}).resolve_schedule(3, 50, 1) == [0, 9, 0]


@pytest.mark.parametrize(
    "method,values",
    [("mctf", {"tau_info": 0, "one_step_ahead": False}), ("atc", {"blocks": [2, 5], "linkage": "single"}),
     ("ltmp", {"counts": {"merge": [1, 1], "prune": [0, 1]}}), ("pitome", {"margin": 0.25}), ("tome", {})],
)
def test_graph_args_come_back_as_the_same_options(method, values):
    """A graph node carries plain fields; the step rebuilds the same typed options from them."""
    options = methods.get(method).make_options(values)
    assert methods.core._options_of(methods.get(method), options.graph_args()) == options
