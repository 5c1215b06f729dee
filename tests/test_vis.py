"""``tomec vis`` on matplotlib's sample photo: one group per final token, every patch in exactly one
group, painted with its group's mean colour; compiled path and eager reference agree on the counts."""

from __future__ import annotations

import numpy as np
import pytest

from tomec import vis
from tomec.models import load_model

from .helpers import make_model

PATCH = 16


def _check_picture(image: np.ndarray, picture: np.ndarray, slots: np.ndarray, groups: int) -> None:
    gh, gw = slots.shape
    centres = picture[PATCH // 2 :: PATCH, PATCH // 2 :: PATCH]  # [gh, gw, 3], never on a boundary
    assert centres.shape[:2] == (gh, gw)
    colours = {tuple(np.round(c, 6)) for c in centres.reshape(-1, 3)}
    assert len(colours) == groups
    for slot in np.unique(slots):
        mask = np.kron(slots == slot, np.ones((PATCH, PATCH), dtype=bool))
        mean = image[mask].mean(axis=0)
        np.testing.assert_allclose(centres[slots == slot], np.broadcast_to(mean, (int((slots == slot).sum()), 3)),
                                   atol=1e-5)


@pytest.mark.parametrize("path", ["compiled", "reference"])
@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_groups_match_final_tokens(path, method):
    model = make_model("test_vit")
    image = vis.load_image(None, 160)
    assert image.shape == (160, 160, 3) and 0.0 <= image.min() and image.max() <= 1.0
    r = 40
    panels = vis.render(image, model, depths=[2, 6], path=path, compiler="eager", method=method, r=r)
    maps, protected = vis.source_maps(model, vis.normalize(image, model), [2, 6], path=path,
                                      compiler="eager", method=method, r=r)
    final_tokens = 101 - r
    (d2, pic2, groups2), (d6, pic6, groups6) = panels
    assert (d2, d6) == (2, 6)
    assert groups6 == final_tokens - protected  # as many groups as final patch tokens
    assert final_tokens - protected < groups2 < 100  # partial merging after two blocks
    for source, groups, picture in ((maps[0], groups2, pic2), (maps[1], groups6, pic6)):
        slots = source[0, protected:].numpy().reshape(10, 10)
        assert slots.min() >= protected  # every patch belongs to a (non-protected) group ...
        assert sorted(np.unique(slots)) == list(range(protected, protected + groups))  # ... no empty one
        _check_picture(image, picture, slots, groups)


def test_method_without_source_map_is_refused():
    with pytest.raises(ValueError, match="dct"):
        vis.render(vis.load_image(None, 160), make_model("test_vit"), method="dct", r=40, compiler="eager")


def test_vis_command_writes_png(tmp_path):
    out = tmp_path / "vis.png"
    vis.main(["--model", "test_vit", "--method", "tome", "--r", "40", "--depths", "3,6",
              "--compiler", "eager", "--out", str(out)])
    from PIL import Image

    assert Image.open(out).size[0] > 0
    assert load_model("test_vit").pretrained_cfg["input_size"][-1] == 160


@pytest.mark.parametrize("depths", [[7], [0], [2, 7], [-1]])
def test_depths_outside_the_blocks_are_refused(depths):
    # test_vit has 6 blocks: 7 drew a panel "after block 7", 0 was a TypeError.
    from tomec.errors import ConfigError

    with pytest.raises(ConfigError, match=r"out of range: VisionTransformer has 6 blocks, .* is 1\.\.6"):
        vis.render(vis.load_image(None, 160), make_model("test_vit"), depths=depths, compiler="eager",
                   method="tome", r=40)


def test_a_model_without_blocks_is_refused():
    from tomec.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="ResNet"):
        vis.check_depths(make_model("resnet18"), [1])
