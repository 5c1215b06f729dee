"""torchvision and Hugging Face ViTs: the same weights as a timm ViT (converted here) give the same
merged logits under tomec, and each framework alone meets the coverage checks (``r=0`` identical,
tokens per block follow the schedule, Inductor and ``compiler="eager"`` agree)."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tomec
from tomec import methods

from .helpers import TOLERANCE, compile_tomec, reference_of, relative_error

class Dims(NamedTuple):
    image: int
    patch: int
    dim: int
    depth: int
    heads: int
    mlp: int
    classes: int


SMALL = Dims(96, 16, 64, 3, 4, 128, 10)
VIT_B16 = Dims(224, 16, 768, 12, 12, 3072, 1000)  # torchvision's vit_b_16, timm's vit_base_patch16_224
IMAGE, PATCH, DIM, DEPTH, HEADS, MLP, CLASSES = SMALL
TOKENS = (IMAGE // PATCH) ** 2 + 1
R = 12


def timm_vit(dims: Dims = SMALL) -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=dims.image, patch_size=dims.patch, embed_dim=dims.dim,
                              depth=dims.depth, num_heads=dims.heads, mlp_ratio=dims.mlp / dims.dim,
                              num_classes=dims.classes).eval()
    with torch.no_grad():  # timm zero-inits the head and biases: random values exercise the conversion
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def torchvision_vit(source: nn.Module, dims: Dims = SMALL) -> nn.Module:
    """torchvision's ViT with ``source``'s (timm) weights."""
    model = torchvision.models.VisionTransformer(
        image_size=dims.image, patch_size=dims.patch, num_layers=dims.depth, num_heads=dims.heads,
        hidden_dim=dims.dim, mlp_dim=dims.mlp, num_classes=dims.classes,
    ).eval()
    s = source.state_dict()
    state = {
        "class_token": s["cls_token"], "encoder.pos_embedding": s["pos_embed"],
        "conv_proj.weight": s["patch_embed.proj.weight"], "conv_proj.bias": s["patch_embed.proj.bias"],
        "encoder.ln.weight": s["norm.weight"], "encoder.ln.bias": s["norm.bias"],
        "heads.head.weight": s["head.weight"], "heads.head.bias": s["head.bias"],
    }
    for i in range(dims.depth):
        t, b = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for name, timm_name in (("ln_1", "norm1"), ("ln_2", "norm2"), ("mlp.0", "mlp.fc1"),
                                ("mlp.3", "mlp.fc2"), ("self_attention.out_proj", "attn.proj")):
            for p in ("weight", "bias"):
                state[f"{t}{name}.{p}"] = s[f"{b}{timm_name}.{p}"]
        state[f"{t}self_attention.in_proj_weight"] = s[f"{b}attn.qkv.weight"]  # same q, k, v order
        state[f"{t}self_attention.in_proj_bias"] = s[f"{b}attn.qkv.bias"]
    model.load_state_dict(state)
    return model


def hf_vit(source: nn.Module, attn_implementation: str, dims: Dims = SMALL) -> nn.Module:
    """Hugging Face's ``ViTForImageClassification`` with ``source``'s (timm) weights."""
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    config = transformers.ViTConfig(image_size=dims.image, patch_size=dims.patch,
                                    num_hidden_layers=dims.depth, hidden_size=dims.dim,
                                    num_attention_heads=dims.heads, intermediate_size=dims.mlp,
                                    num_labels=dims.classes, layer_norm_eps=1e-6,
                                    attn_implementation=attn_implementation)
    model = transformers.ViTForImageClassification(config).eval()
    s = source.state_dict()
    state = {
        "vit.embeddings.cls_token": s["cls_token"], "vit.embeddings.position_embeddings": s["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
        "vit.layernorm.weight": s["norm.weight"], "vit.layernorm.bias": s["norm.bias"],
        "classifier.weight": s["head.weight"], "classifier.bias": s["head.bias"],
    }
    ours = model.state_dict()
    for i in range(dims.depth):  # transformers 5 names (q/k/v/o_proj, mlp.fc1/fc2)
        h, b = f"vit.layers.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            for part, name in zip(s[f"{b}attn.qkv.{p}"].chunk(3), ("q_proj", "k_proj", "v_proj")):
                state[f"{h}attention.{name}.{p}"] = part
            for name, timm_name in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                                    ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                state[f"{h}{name}.{p}"] = s[f"{b}{timm_name}.{p}"]
    missing = set(ours) - set(state)
    assert not missing, f"conversion misses {sorted(missing)} (transformers {transformers.__version__})"
    model.load_state_dict(state)
    return model


class Logits(nn.Module):
    """Hugging Face models return an output object: the logits are what is compared."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _framework_models() -> dict[str, nn.Module]:
    source = timm_vit()
    return {"timm": source, "torchvision": torchvision_vit(source),
            "hf_eager": Logits(hf_vit(source, "eager")), "hf_sdpa": Logits(hf_vit(source, "sdpa"))}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return _framework_models()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def test_converted_weights_give_the_same_unmerged_logits(models, x):
    with torch.no_grad():
        expect = models["timm"](x)
        for name, model in models.items():
            assert relative_error(model(x), expect) <= TOLERANCE, name


def test_vit_b16_same_weights_same_merged_logits():
    """Full-size ViT-B/16 (torchvision's ``vit_b_16`` architecture): one set of random weights in
    timm, torchvision and Hugging Face gives the same merged logits as timm's eager reference, and
    the tokens entering each block follow the schedule."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vit_b_16().state_dict().items()}
    source = timm_vit(VIT_B16)
    models = {"timm": source, "torchvision": torchvision_vit(source, VIT_B16),
              "hf_sdpa": Logits(hf_vit(source, "sdpa", VIT_B16))}
    assert {k: v.shape for k, v in models["torchvision"].state_dict().items()} == shapes
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    r = 96  # 8 per block
    ref = reference_of(source, method="tome", r=r, inflect=0)
    with torch.no_grad():
        expect = ref(x)
        for name, model in models.items():
            merged, be = compile_tomec(model, method="tome", r=r, inflect=0, compiler="eager")
            err = relative_error(merged(x), expect)
            assert err <= TOLERANCE, f"{name}: relative error {err:.2e} against timm's eager reference"
            assert be.schedule == [8] * 12 and be.tokens_per_block == [197 - 8 * i for i in range(12)]


@pytest.mark.parametrize("name", ["torchvision", "hf_eager", "hf_sdpa"])
def test_framework_coverage(models, x, name):
    model = models[name]
    with torch.no_grad():
        plain = model(x)
        unmerged, be0 = compile_tomec(model, method="tome", r=0, compiler="eager")
        if name == "torchvision":  # its attention call is spelled out in linear + SDPA: same math
            assert relative_error(unmerged(x), plain) <= TOLERANCE
        else:
            assert torch.equal(unmerged(x), plain)
        merged, be = compile_tomec(model, method="tome", r=R, compiler="eager")
        out = merged(x)
    assert be0.tokens_per_block == [TOKENS] * DEPTH
    assert be.tokens_per_block == [TOKENS - sum(be.schedule[:i]) for i in range(DEPTH)]
    assert relative_error(out, plain) > 100 * TOLERANCE  # the merge changed the answer


@pytest.mark.parametrize("method", methods.available())
def test_same_weights_same_merged_logits(models, x, method):
    ref = reference_of(models["timm"], method=method, r=R)
    with torch.no_grad():
        expect = ref(x)
        for name, model in models.items():
            merged, be = compile_tomec(model, method=method, r=R, compiler="eager")
            err = relative_error(merged(x), expect)
            assert err <= TOLERANCE, f"{name}: relative error {err:.2e} against timm's eager reference"


class HiddenStates(nn.Module):
    """``output_hidden_states=True``: Hugging Face's first call breaks the graph at its hook
    installation, so the classifier runs in a graph of its own after the block graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x, output_hidden_states=True)
        return out.logits + 0 * out.hidden_states[-1][:, :1, :1].sum()


def test_hf_hidden_states_head_graph_after_a_break(models, x):
    model = HiddenStates(models["hf_sdpa"].model).eval()
    ref = reference_of(models["timm"], method="tome", r=R)
    torch._dynamo.reset()
    be = tomec.backend(method="tome", r=R, compiler="eager")  # strict
    with torch.no_grad():
        err = relative_error(torch.compile(model, backend=be)(x), ref(x))
    assert err <= TOLERANCE, err
    assert len(be._reports) >= 2 and "head after its block graph" in be.report()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision", "hf_sdpa"])
def test_inductor_agrees_with_eager(models, x, name):
    with torch.no_grad():
        eager, _ = compile_tomec(models[name], method="tome", r=R, compiler="eager")
        expect = eager(x)
        compiled, _ = compile_tomec(models[name], method="tome", r=R)
        assert relative_error(compiled(x), expect) <= TOLERANCE


class _MHAUses(nn.Module):
    """Two uses of ``nn.MultiheadAttention`` that are not plain self-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.weights = nn.MultiheadAttention(DIM, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        a = self.cross(x, memory, memory, need_weights=False)[0]
        b, w = self.weights(x, x, x, need_weights=True)
        return x + a + b + w.sum()


def test_only_plain_self_attention_calls_are_spelled_out():
    from tomec.passes.decompose import decompose_attention_calls

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(_MHAUses().eval(), backend=capture, fullgraph=True)(torch.randn(2, 5, DIM), torch.randn(2, 7, DIM))
    lines = decompose_attention_calls(graphs[0])
    assert len(lines) == 2 and all(line.startswith("kept") for line in lines), lines
    assert "not self-attention" in lines[0] and "the attention weights are used" in lines[1]
