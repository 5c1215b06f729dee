"""Bad input: each a clear tomec error naming the numbers or the names, never a trace from Inductor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tomec
from tests.helpers import compile_error, images, make_model
from tomec.errors import (
    ConfigError,
    ScheduleError,
    UnsupportedDtypeError,
    UnsupportedModelError,
)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="tome2", r=8), ConfigError, "unknown method 'tome2'; known methods: atc, crossget, dct, diffrate, dtem, fpet, ltmp, mctf, "
         "pitome, tofu, tome"),
        (dict(r=-3), ConfigError, "non-negative integer, got -3"),
        (dict(r=12.5), ConfigError, "non-negative integer, got 12.5"),
        (dict(r="8"), ConfigError, "non-negative integer, got '8'"),
        (dict(r=8, inflect=-1.2), ConfigError, r"inflect must be in \[-1, 1\], got -1.2"),
        (dict(r=8, inflect=float("nan")), ConfigError, "inflect must be a number"),
        (dict(), ConfigError, "give r="),
        (dict(r=8, schedule=[1] * 12), ConfigError, "not both"),
        (dict(r=8, compiler="tvm"), ConfigError, "compiler='tvm'"),
        (dict(r=8, prop_attn_impl="flash"), ConfigError, "prop_attn_impl='flash'"),
        (dict(r=8, protect=-1), ConfigError, "protect must be"),
        (dict(r=8, margin=0.5), ConfigError, "method 'tome' has no option 'margin'; its options are: none"),
        (dict(r=8, prop_attn="yes"), ConfigError, "prop_attn must be True or False"),
    ],
)
def test_config_errors_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        tomec.backend(**kwargs)


def test_r_larger_than_mergeable_tokens():
    err = compile_error(make_model("test_vit"), images("test_vit", 2), r=500, compiler="eager")
    assert isinstance(err, ScheduleError)
    assert "r=500" in str(err) and "at most 98 of the 100 mergeable tokens" in str(err)


def test_r_far_beyond_the_capacity_is_refused_before_it_is_spread(monkeypatch):
    """r=10**8 is refused by the capacity check before the schedule is spread: per_layer (which the
    spread of tomec 0.x called once per base up to r / L, ten million times here) is never called."""
    from tomec import schedule

    def no_spread(*args):
        raise AssertionError("per_layer called for an r beyond the capacity")

    monkeypatch.setattr(schedule, "per_layer", no_spread)
    err = compile_error(make_model("test_vit"), images("test_vit", 2), r=10**8, compiler="eager")
    assert isinstance(err, ScheduleError), err
    assert "r=100000000" in str(err) and "at most 98 of the 100 mergeable tokens" in str(err)


def test_schedule_of_wrong_length():
    err = compile_error(make_model("test_vit"), images("test_vit", 2), schedule=[4] * 12, compiler="eager")
    assert isinstance(err, ScheduleError)
    assert "12 entries but the model has 6 attention blocks" in str(err)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_model_without_attention_blocks_strict_and_lenient():
    model, x = ConvNet().eval(), torch.randn(2, 3, 16, 16)
    err = compile_error(model, x, r=8)
    assert isinstance(err, UnsupportedModelError)
    assert "no attention block found" in str(err) and "strict=False" in str(err)
    torch._dynamo.reset()
    be = tomec.backend(r=8, strict=False, compiler="eager")
    with pytest.warns(UserWarning, match="compiling the graph unchanged"):
        with torch.no_grad():
            out = torch.compile(model, backend=be)(x)
    with torch.no_grad():
        assert torch.equal(out, model(x))
    assert "compiled unchanged" in be.report()


class IntScoreBlock(nn.Module):
    """An attention block whose keys (and scores) are integers: no merge op exists for them."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = q.unsqueeze(1).round().int(), k.unsqueeze(1).round().int()
        attn = (q @ k.transpose(-2, -1)).float().softmax(dim=-1)
        return x + self.proj((attn @ v.unsqueeze(1)).squeeze(1))


def test_unsupported_dtype():
    err = compile_error(IntScoreBlock().eval(), torch.randn(2, 9, 16), r=2, protect=0)
    assert isinstance(err, UnsupportedDtypeError)
    assert "int32" in str(err) and "block 0" in str(err) and "float32" in str(err)


def test_unknown_inductor_option_through_the_registered_backend():
    torch._dynamo.reset()
    model = make_model("test_vit")
    compiled = torch.compile(model, backend="tomec", options={"r": 8, "no_such_knob": 1})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        with torch.no_grad():
            compiled(images("test_vit", 1))
    assert isinstance(info.value.inner_exception, ConfigError)
    assert "no_such_knob" in str(info.value.inner_exception)
    assert "tomec's are" in str(info.value.inner_exception) and "list_options" in str(info.value.inner_exception)


def _named_backend_error(options: dict) -> ConfigError:
    torch._dynamo.reset()
    compiled = torch.compile(make_model("test_vit"), backend="tomec", options=options)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info, torch.no_grad():
        compiled(images("test_vit", 1))
    assert isinstance(info.value.inner_exception, ConfigError), repr(info.value.inner_exception)
    return info.value.inner_exception


@pytest.mark.parametrize(
    "options,expect",
    [
        # a typo under compiler="eager" used to be ignored silently
        ({"r": 8, "compiler": "eager", "inflct": 0.0}, ["'inflct'", "'inflect'", "method 'tome'"]),
        # another method's option used to read as an unknown Inductor option
        ({"r": 8, "margin": 0.5}, ["'margin' belongs to method(s) ['pitome']", "not to 'tome'"]),
        # Inductor options that eager would drop
        ({"r": 8, "compiler": "eager", "max_autotune": True}, ["['max_autotune']", "compiler='eager'"]),
        ({"r": 8, "trace_source": True}, ["trace_source=True", "backend.last_info", "tomec.backend("]),
    ],
)
def test_registered_backend_options_are_checked(options, expect):
    err = str(_named_backend_error(options))
    for text in expect:
        assert text in err, err


def test_registered_backend_keeps_one_backend_per_compile():
    """A head graph after a break is only told apart with the block graph's backend state."""
    from .test_graph_breaks import X, HeadBreak, _vit

    torch._dynamo.reset()
    compiled = torch.compile(HeadBreak(_vit()).eval(), backend="tomec",
                             options={"r": 12, "compiler": "eager"})
    with torch.no_grad():
        assert compiled(X).shape == (2, 1000)




def test_dynamic_token_count_is_refused():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    blocks = nn.Sequential(*[Block(dim=32, num_heads=2) for _ in range(2)]).eval()
    x = torch.randn(2, 17, 32)
    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(x, 1)  # the token axis itself
    compiled = torch.compile(blocks, backend=tomec.backend(r=4, compiler="eager", protect=1))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info, torch.no_grad():
        compiled(x)
    err = info.value.inner_exception
    assert isinstance(err, UnsupportedModelError)
    assert "is dynamic; tomec needs a static image size" in str(err)


class LatePosition(nn.Module):
    """A per-token parameter added between blocks: merged tokens cannot broadcast with it."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(dim=32, num_heads=2) for _ in range(2)])
        self.late = nn.Parameter(torch.randn(1, 17, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](x) + self.late)


def test_shape_failure_after_merging_is_named_without_log_noise(capfd):
    capfd.readouterr()
    err = compile_error(LatePosition().eval(), torch.randn(2, 17, 32), r=4, protect=1, compiler="eager")
    assert isinstance(err, UnsupportedModelError)
    assert "fails on the new token counts" in str(err), str(err)
    assert "Traceback" not in capfd.readouterr().err  # the error says it; the fake-tensor log does not repeat it
