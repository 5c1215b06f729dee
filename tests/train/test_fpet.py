"""FPET's adapter training: the straight-through training forward is the hard merge (gated attention
included), training moves the adapter, the shipped adapter gives the recorded accuracy."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import tomec
from tests.helpers import images, make_gated_model, make_model, relative_error
from tomec import methods
from tomec.train.fpet import FpetAdapter, soft_forward, train_adapter


def _adapter(d, seed=0, scale=0.5):
    adapter = FpetAdapter(d, seed=seed).double()
    with torch.no_grad():  # a trained adapter's weights are far from the init's 1e-3
        adapter.up.mul_(scale / 1e-3)
    return adapter.eval()


@pytest.mark.parametrize("gated", [False, True])
def test_training_forward_is_the_hard_merge(gated):
    """The dense straight-through merge's forward values are the reference's hard merge, the attention
    gate included (the training forward once ran an attention copy without the gate)."""
    model = (make_gated_model if gated else make_model)("test_vit")
    x = images("test_vit", 2)
    adapter = _adapter(32, seed=4).float()
    ref = tomec.reference.patch(copy.deepcopy(model), "fpet", r=50, adapter=adapter)
    with torch.no_grad():
        want, got = ref(x), soft_forward(model, x, adapter)
    assert relative_error(got, want) <= 1e-5


def test_training_moves_the_adapter_and_restores_the_backbone():
    model = make_model("test_vit")
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    xs = images("test_vit", 16)
    trained = train_adapter(model, (xs, y), steps=3, batch_size=8, progress=False)
    start = train_adapter(model, (xs, y), steps=1, batch_size=8, lr=0.0, progress=False)
    assert not torch.equal(trained.down, start.down)
    assert all(not p.requires_grad for p in model.parameters()) is False  # the backbone is restored
    assert methods.get("fpet").reduction_blocks(methods.FpetOptions(block=None), 6) == [3]


def test_recorded_adapter_accuracy():
    """The shipped adapter (seed 0) gives the accuracy and NLL bench/finetune_fpet.py recorded."""
    from tomec.bench import finetune_fpet
    from tomec.bench.digits import digits_data, load_trained

    recorded = json.loads(finetune_fpet.RESULT_FILE.read_text())
    _, _, x_test, y_test = digits_data()
    row = recorded["rows"][0]
    assert row["seed"] == 0
    scores = finetune_fpet.evaluate(load_trained(), x_test, y_test, adapter=finetune_fpet.ADAPTER)
    assert scores["accuracy"] == pytest.approx(row["trained_adapter"]["accuracy"], abs=1e-9)
    assert scores["nll"] == pytest.approx(row["trained_adapter"]["nll"], rel=1e-5)
