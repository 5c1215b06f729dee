"""DTEM's training: the heads learn by soft merging (backbone frozen), the split is seeded, the
shipped heads give the recorded accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from tomec.errors import ConfigError
from tomec.train import dtem


@pytest.mark.parametrize("how", [dict(r=40), dict(schedule=[16, 8, 4, 2, 1, 0], distill=True)])
def test_train_heads_trains_only_the_heads(how):
    from tomec.bench.digits import digits_data, load_trained

    model = load_trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, _, _ = digits_data()
    start = dtem.DtemHeads.for_model(model)
    train = dict(steps=2, lr=1e-2, batch_size=16, progress=False)
    heads = dtem.train_heads(model, (x[:64], y[:64]), **train, **how)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert not hasattr(model, "_tomec_state")  # the training patch is undone
    assert any(not torch.equal(a, b) for a, b in zip(heads.parameters(), start.parameters()))
    assert len(heads) == 6 and heads[0].weight.shape == (16, 64)
    if how.get("distill"):  # the teacher's logits, not the labels, drive it
        labels = dtem.train_heads(model, (x[:64], y[:64]), **train, **{**how, "distill": False})
        assert any(not torch.equal(a, b) for a, b in zip(heads.parameters(), labels.parameters()))


def test_soft_merging_random_split_is_seeded():
    """Training draws a new A/B split per block (DTEM's random split): seeded, so the same seed gives
    the same logits bit for bit and another seed or ToMe's parity split other logits."""
    from tomec.bench.digits import digits_data, load_trained

    model = load_trained()
    heads = dtem.DtemHeads.for_model(model)
    x = digits_data()[0][:8]

    def logits(**how):
        with torch.no_grad(), dtem.soft_merging(model, heads, schedule=[16, 8, 4, 2, 1, 0], **how):
            return model(x)

    first = logits(seed=0)
    assert torch.equal(first, logits(seed=0))
    assert not torch.equal(first, logits(seed=1))
    assert not torch.equal(first, logits(split="parity"))
    with pytest.raises(ConfigError, match="split"):
        logits(split="checkerboard")


def test_train_heads_needs_r_or_a_schedule():
    from tomec.bench.digits import load_trained

    with pytest.raises(ConfigError, match="r= .* or schedule="):
        dtem.train_heads(load_trained(), (torch.zeros(2, 1, 16, 16), torch.zeros(2).long()), steps=1)


def test_recorded_finetune_accuracy():
    """The shipped trained heads (seed 0) give the accuracy and NLL recorded by
    bench/finetune_dtem.py at the recorded schedule (eval only)."""
    from tomec.bench import finetune_dtem
    from tomec.bench.digits import digits_data, load_trained

    recorded = json.loads(finetune_dtem.RESULT_FILE.read_text())
    model = load_trained()
    _, _, x_test, y_test = digits_data()
    row = recorded["rows"][0]
    assert row["seed"] == 0
    scores = finetune_dtem.evaluate(model, x_test, y_test, "dtem", recorded["meta"]["schedule"],
                                    heads=finetune_dtem.HEADS)
    assert scores["accuracy"] == pytest.approx(row["trained_heads"]["accuracy"], abs=1e-9)
    assert scores["nll"] == pytest.approx(row["trained_heads"]["nll"], rel=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_soft_merging_without_merges_is_the_model(gated):
    """With nothing merged (sizes all 1) the soft-merging forward is the model's own, gate included
    (the shared forward, tomec.train.vit)."""
    from tests.helpers import images, make_gated_model, make_model

    model = (make_gated_model if gated else make_model)("test_vit")
    x = images("test_vit", 2)
    heads = dtem.DtemHeads.for_model(model)
    with torch.no_grad():
        plain = model(x)
        with dtem.soft_merging(model, heads, schedule=[0] * 6):
            soft = model(x)
    torch.testing.assert_close(soft, plain, rtol=1e-5, atol=1e-5)
