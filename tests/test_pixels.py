import numpy as np
import pytest
from PIL import Image
from skimage import data

from raymem.pixels import compare, confirm_pairs, tile_distances


def test_tile_distances_are_per_tile_rms():
    a = np.zeros((8, 8, 3), np.float32)
    b = a.copy()
    b[:4, :4] = 0.5  # top-left tile differs by 0.5 everywhere
    d = tile_distances(a, b, tiles=2)
    np.testing.assert_allclose(d, [0.5, 0, 0, 0], atol=1e-7)


def test_copy_template_and_different_image(tmp_path):
    photo = Image.fromarray(data.astronaut())
    photo.save(tmp_path / "train.png")
    photo.resize((256, 256)).save(tmp_path / "copy.png")  # a rescaled copy
    edited = np.asarray(photo).copy()
    edited[:128, :128] = 0  # one of 16 tiles replaced: a template copy
    Image.fromarray(edited).save(tmp_path / "template.png")
    Image.fromarray(data.coffee()).save(tmp_path / "other.png")
    out = confirm_pairs(
        {
            name: (str(tmp_path / f"{name}.png"), "t1", str(tmp_path / "train.png"))
            for name in ("copy", "template", "other")
        },
        size=512,
        tiles=4,
    )
    assert out["copy"].max_l2 < 0.1 and out["copy"].share_within(0.15) == 1.0
    assert out["template"].max_l2 > 0.15 and out["template"].share_within(0.15) == pytest.approx(15 / 16)
    assert out["other"].max_l2 > 0.15 and out["other"].share_within(0.15) < 0.5


def test_unreachable_training_image_is_recorded_not_raised(tmp_path):
    Image.fromarray(data.astronaut()).save(tmp_path / "g.png")
    ev = compare(str(tmp_path / "g.png"), "t1", str(tmp_path / "missing.png"), 64, 4)
    assert ev.tile_l2 is None and ev.max_l2 is None and "missing.png" in ev.error
    assert compare(str(tmp_path / "g.png"), "t1", None, 64, 4).error == "the training row has no image_uri"
