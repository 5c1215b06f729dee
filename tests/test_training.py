"""Training through merges: gradients of the merge ops and of whole merged models.

The matching is a discrete choice (no gradient); everything after it (the weighted merge, sizes,
proportional attention, the method's own weights) is differentiable with respect to the tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import TOLERANCE, compile_tomec, images, make_model, random_map, reference_of
from tomec import methods, ops

TRAIN_R = 40  # test_vit: 101 tokens
DEPTH = 3  # blocks: enough for merged blocks after merged blocks, and keeps the suite short


# --- the merge op --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ops.MERGE_MODES)
@pytest.mark.parametrize("n_dropped", [0, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_merge_gradcheck(mode, n_dropped, weighted):
    g = torch.Generator().manual_seed(n_dropped)
    batch, n, channels, n_out = 2, 9, 4, 5
    dest = random_map(batch, n, n_out, n_dropped, seed=7)
    x = torch.randn(batch, n, channels, dtype=torch.float64, generator=g, requires_grad=True)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).double().requires_grad_()
    w = (torch.rand(batch, n, 1, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    inputs = (x, size, w) if weighted else (x, size)

    def run(x, size, w=None):
        return ops.merge(x, size, dest, n_out, w, n_dropped=n_dropped, mode=mode)

    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("mode", ops.MERGE_MODES)
def test_dense_merge_equals_merge_with_gradients(mode):
    """``merge_dense`` (the Triton merge's gradient formula) against the gather merge: values and
    gradients in fp64."""
    g = torch.Generator().manual_seed(3)
    batch, n, channels, n_out, n_dropped = 3, 17, 6, 9, 3
    dest = random_map(batch, n, n_out, n_dropped, seed=11)
    x = torch.randn(batch, n, channels, dtype=torch.float64, generator=g, requires_grad=True)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).double().requires_grad_()
    w = (torch.rand(batch, n, 1, dtype=torch.float64, generator=g) + 0.1).requires_grad_()
    upstream = torch.randn(batch, n_out, channels, dtype=torch.float64, generator=g)
    results = []
    for fn in (
        lambda: ops.merge(x, size, dest, n_out, w, n_dropped=n_dropped, mode=mode),
        lambda: ops.merge_dense(x, size, dest, n_out, w, mode=mode),
    ):
        out, size_out = fn()
        grads = torch.autograd.grad((out * upstream).sum() + size_out.sum(), (x, size, w))
        results.append((out, size_out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- every method's merge step -----------------------------------------------------------------


def _step_inputs(n=17, heads=2, d=4, seed=0):
    """A block's tokens, keys, queries, sizes; 17 tokens = CLS + a 4×4 grid (FPET needs a square)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, heads * d, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.randn(2, heads, n, d, dtype=torch.float64, generator=g)
    queries = torch.randn(2, heads, n, d, dtype=torch.float64, generator=g)
    size = torch.randint(1, 4, (2, n, 1), generator=g).double()
    attn_in = torch.randn(2, n, heads * d, dtype=torch.float64, generator=g)
    return x, keys, queries, size, attn_in


@pytest.mark.parametrize("method", methods.available())
def test_merge_step_gradcheck(method):
    """Each method's block step is differentiable in the tokens (matching held fixed), fp64."""
    spec = methods.get(method)
    x, keys, queries, size, attn_in = _step_inputs()
    r, protected, layer, num_layers = 4, 1, 1, 4
    options = spec.make_options({})
    params = None
    if spec.params is not None:  # learned tensors (DTEM's head), as the passes would give them
        params = spec.params(options, layer=layer, num_layers=num_layers, channels=x.shape[-1],
                             head_dim=keys.shape[-1])
        params = {name: t.double() for name, t in params.items()}
    if spec.site(options) == "block":
        fn = lambda x: spec.transform(x, r, protected)  # noqa: E731
    else:
        def fn(x):
            out, size_out, _ = methods.merge_step(
                x, size, None, keys, queries, method=method, r=r, protected=protected, layer=layer,
                num_layers=num_layers, scale=0.5, options=options, attn_in=attn_in, params=params,
            )
            return out, size_out
    out = fn(x)[0] if spec.site(options) != "block" else fn(x)
    assert out.shape == (2, x.shape[1] - r, x.shape[2])
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


# --- whole models in training mode -------------------------------------------------------------


def _loss_and_grads(model, x, params=None):
    """Loss, then the gradients of ``params`` (a module; default ``model`` itself) by name."""
    params = model if params is None else params
    params.zero_grad(set_to_none=True)
    out = model(x)
    loss = out.logsumexp(-1).mean() + 1e-3 * (out**2).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}


def _check_train_parity(method, compiler, fused=True, depth=DEPTH):
    model = make_model("test_vit", fused, depth=depth).train()
    x = images("test_vit", 2)
    ref = reference_of(model, method=method, r=TRAIN_R).train()
    compiled_model = copy.deepcopy(model)
    compiled, be = compile_tomec(compiled_model, method=method, r=TRAIN_R, compiler=compiler)
    out_ref, grads_ref = _loss_and_grads(ref, x)
    out, grads = _loss_and_grads(compiled, x, compiled_model)
    assert sum(be.schedule) == TRAIN_R
    torch.testing.assert_close(out, out_ref, rtol=TOLERANCE, atol=TOLERANCE * out_ref.abs().max().item())
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name, grad in grads.items():
        scale = grads_ref[name].abs().max().item() + 1e-12
        err = (grad - grads_ref[name]).abs().max().item() / scale
        assert err <= TOLERANCE, f"{method}: gradient of {name} differs by {err:.2e} (relative)"
    return model, x


@pytest.mark.parametrize("method", methods.available())
def test_training_gradients_equal_the_reference(method):
    """``model.train()`` under tomec: logits and every parameter's gradient equal the eager
    reference's (dropout off, so both runs are deterministic)."""
    _check_train_parity(method, "eager")


def test_training_gradients_manual_attention():
    _check_train_parity("tome", "eager", fused=False)


def test_training_gradients_differ_from_unmerged():
    """The merge changes the gradients (the test above would pass for a pass that did nothing)."""
    model = make_model("test_vit", depth=DEPTH).train()
    x = images("test_vit", 2)
    _, plain = _loss_and_grads(copy.deepcopy(model), x)
    _, merged = _loss_and_grads(reference_of(model, method="tome", r=TRAIN_R).train(), x)
    name = f"blocks.{DEPTH - 1}.mlp.fc2.weight"
    assert (plain[name] - merged[name]).abs().max() > 1e-3 * plain[name].abs().max()


def test_training_with_dropout_runs_and_follows_the_schedule():
    model = make_model(
        "test_vit", depth=DEPTH, drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1
    ).train()
    compiled, be = compile_tomec(model, method="tome", r=TRAIN_R, compiler="eager")
    out = compiled(images("test_vit", 2))
    out.sum().backward()
    assert be.tokens_per_block == [101 - sum(be.schedule[:i]) for i in range(DEPTH)]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_one_optimizer_step_lowers_the_loss_through_merges():
    torch.manual_seed(0)
    model = make_model("test_vit", depth=DEPTH).train()
    compiled, _ = compile_tomec(model, method="pitome", r=TRAIN_R, compiler="eager")
    x, target = images("test_vit", 4), torch.tensor([1, 2, 3, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(compiled(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_inductor_compiles_forward_and_backward():
    """AOTAutograd + Inductor on the merged training graph: same gradients as the reference."""
    _check_train_parity("tome", "inductor", depth=2)
