import numpy as np
import pytest
from PIL import Image
from skimage import data

from raymem.label_inputs import pixel_evidence
from raymem.pixels import background_p5, compare, confirm_pairs, pixel_checks_table, tile_distances


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
    out, background = confirm_pairs(
        {
            name: (str(tmp_path / f"{name}.png"), "t1", str(tmp_path / "train.png"))
            for name in ("copy", "template", "other")
        },
        size=512,
        tiles=4,
    )
    assert background == {}
    assert out["copy"].max_l2 < 0.1 and out["copy"].share_within(0.15) == 1.0
    assert out["template"].max_l2 > 0.15 and out["template"].share_within(0.15) == pytest.approx(15 / 16)
    assert out["other"].max_l2 > 0.15 and out["other"].share_within(0.15) < 0.5


def test_unreachable_training_image_is_recorded_not_raised(tmp_path):
    Image.fromarray(data.astronaut()).save(tmp_path / "g.png")
    ev = compare(str(tmp_path / "g.png"), "t1", str(tmp_path / "missing.png"), 64, 4)
    assert ev.tile_l2 is None and ev.max_l2 is None and "missing.png" in ev.error
    assert compare(str(tmp_path / "g.png"), "t1", None, 64, 4).error == "the training row has no image_uri"


def test_background_pairs_are_training_images_and_round_trip_through_the_table(tmp_path):
    photo = Image.fromarray(data.astronaut())
    photo.save(tmp_path / "train.png")
    photo.resize((256, 256)).save(tmp_path / "near.png")
    Image.fromarray(data.coffee()).save(tmp_path / "other.png")
    units, background = confirm_pairs(
        {"u": (str(tmp_path / "near.png"), "t1", str(tmp_path / "train.png"))},
        size=128,
        tiles=4,
        background={
            "t1": (str(tmp_path / "train.png"), "t2", str(tmp_path / "near.png"), 0.875),  # float32-exact scores
            "t3": (str(tmp_path / "other.png"), "t1", str(tmp_path / "train.png"), 0.5),
            "t4": (str(tmp_path / "gone.png"), "t1", str(tmp_path / "train.png")),
        },
    )
    assert set(units) == {"u"} and set(background) == {"t1", "t3", "t4"}
    assert background["t1"].max_l2 < 0.1 < background["t3"].max_l2 and "gone.png" in background["t4"].error
    # the unreadable pair is left out of the percentile; two readable ones span it (read here with a
    # floor of one pair: the labeler's floor, MIN_PIXEL_BACKGROUND, needs 20)
    p5 = background_p5(background, min_pairs=1)
    assert background["t1"].max_l2 < p5 < background["t3"].max_l2 and background_p5({}, min_pairs=1) is None
    assert background_p5(background) is None  # two pairs: no percentile to read at the labeler's floor
    # pairs at or above the near-duplicate link are one image, not a background of distinct ones
    assert background["t1"].score == 0.875
    assert background_p5(background, link=0.8, min_pairs=1) == background["t3"].max_l2
    table = pixel_checks_table("s", units, background)
    assert table.column("query_set").to_pylist() == ["units", "background", "background", "background"]
    assert pixel_evidence(table) == units and pixel_evidence(table, "background") == background
    # scans published before the background have no query_set: every row is a scan image's
    assert pixel_evidence(table.drop_columns(["query_set"])).keys() == {"u", "t1", "t3", "t4"}
