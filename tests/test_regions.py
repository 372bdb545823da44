"""Region-level copy detection (raymem.regions) and the labeler's `region` MU subtype, on synthetic
images written to disk: a copied corner, a copied background behind a new foreground, a watermark
banner shared by many training images, shared flat regions (no copy), and a null simulation of
independent images that measures the false-positive rate."""

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from raymem.config import ThresholdsConfig
from raymem.label import EntityStats, LabelInputs, label_units, region_check_pairs, with_work_copies
from raymem.regions import (
    RegionEvidence,
    RegionMatch,
    background_p99,
    check_regions,
    compare_regions,
    duplicated_patch,
    most_copied,
    pair_index,
    private_mark,
    region_checks_table,
    region_evidence,
    region_match,
    same_region,
)
from tests.test_label import BG, context, gen, image, nulls, text_vectors

SIZE, GRID = 128, 8  # 16-pixel tiles
T = ThresholdsConfig()


def textured(rng, size=SIZE) -> np.ndarray:
    """A photo-like (size, size, 3) image in [0, 1]: smooth colour fields plus luminance texture at a
    2-pixel scale, std 0.15 within a tile (i.i.d. per-pixel colour noise is not photo-like: JPEG's chroma
    subsampling erases it)."""
    coarse = rng.random((size // 16, size // 16, 3))
    smooth = np.kron(coarse, np.ones((16, 16, 1)))
    luminance = np.kron(rng.normal(0, 0.15, (size // 2, size // 2, 1)), np.ones((2, 2, 3)))
    return np.clip(0.6 * smooth + 0.2 + luminance, 0, 1).astype(np.float32)


def save(path, x: np.ndarray, jpeg: int | None = None):
    img = Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))
    if jpeg:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=jpeg)
        buf.seek(0)
        img = Image.open(buf)
    img.save(path, "PNG")
    return str(path)


def copied(a, b) -> list[int]:
    return compare_regions(a, b, "t", GRID).copied_tiles(T.region_l2, T.region_texture)


def tiles_in(rows: range, cols: range) -> list[int]:
    return sorted(r * GRID + c for r in rows for c in cols)


def test_a_copied_corner_is_found_tile_by_tile_and_unrelated_images_share_nothing():
    rng = np.random.default_rng(0)
    train, other = textured(rng), textured(rng)
    gen_img = other.copy()
    gen_img[:64, :64] = train[:64, :64]  # the top-left quarter: 4 x 4 tiles
    assert copied(gen_img, train) == tiles_in(range(4), range(4))
    assert copied(other, train) == []


def test_a_background_behind_a_new_foreground_is_found_and_the_foreground_is_not():
    rng = np.random.default_rng(1)
    background = textured(rng)
    train, gen_img = background.copy(), background.copy()
    train[32:96, 32:96] = textured(rng)[32:96, 32:96]  # one subject in the middle ...
    gen_img[32:96, 32:96] = textured(rng)[32:96, 32:96]  # ... another one in the generation
    found = copied(gen_img, train)
    centre = tiles_in(range(2, 6), range(2, 6))
    assert len(found) == GRID * GRID - len(centre) and not set(found) & set(centre)


def test_shared_flat_regions_are_not_copies():
    rng = np.random.default_rng(2)
    a, b = textured(rng), textured(rng)
    a[:64], b[:64] = 0.55, 0.55  # the same plain sky in both: l2 0, but no texture
    ev = compare_regions(a, b, "t", GRID)
    assert min(ev.tile_l2[:32]) == 0 and ev.copied_tiles(T.region_l2, T.region_texture) == []
    assert ev.copied_tiles(T.region_l2, 0.0) == list(range(32))  # what texture rules out


def test_flat_tiles_of_a_saturated_colour_are_not_texture():
    """Texture is spatial: a flat green tile has channels far apart (0.27, 0.55, 0.24) but no pixel that
    differs from its neighbour. Measured over pixels and channels together, two such meadows -- each with
    a faint texture of its own -- came out a copy on most of their tiles (the planted worlds' region
    background of 55 of 64 tiles was this)."""
    rng = np.random.default_rng(4)
    green = np.array([0.27, 0.55, 0.24], dtype=np.float32)
    a = green + rng.normal(0, 0.02, (SIZE, SIZE, 1)).astype(np.float32)
    b = green + rng.normal(0, 0.02, (SIZE, SIZE, 1)).astype(np.float32)
    ev = compare_regions(a, b, "t", GRID)
    assert max(ev.tile_l2) <= T.region_l2 and max(ev.texture) < 0.05  # close, and flat
    assert ev.copied_tiles(T.region_l2, T.region_texture) == []
    # a textured tile in one channel only still counts (pooled over channels, not averaged away)
    stripes = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
    stripes[:, ::2, 0] = 1.0
    assert min(compare_regions(stripes, stripes, "t", GRID).texture) >= T.region_texture


def test_a_recompressed_and_shifted_in_colour_copy_is_still_found(tmp_path):
    rng = np.random.default_rng(3)
    train = textured(rng)
    gen_img = textured(rng)
    gen_img[64:, :] = np.clip(train[64:, :] + 0.03, 0, 1)  # the lower half, 3 % brighter ...
    from raymem.pixels import load_rgb

    a = load_rgb(save(tmp_path / "g.png", gen_img, jpeg=75), SIZE)  # ... and through JPEG at quality 75
    b = load_rgb(save(tmp_path / "t.png", train), SIZE)
    assert copied(a, b) == tiles_in(range(4, 8), range(8))


def test_null_simulation_false_positive_rate_on_independent_images():
    """2,000 pairs of independent photo-like images at the default thresholds: how often does a pair
    come out a region copy (>= region_tiles copied tiles)? Measured, and bounded at 1 %."""
    rng = np.random.default_rng(2024)
    hits, tiles = 0, 0
    for _ in range(2000):
        found = copied(textured(rng), textured(rng))
        tiles += len(found)
        hits += len(found) >= T.region_tiles
    assert hits / 2000 <= 0.01, (hits, tiles)


def write_world(tmp_path):
    """Training images on disk: 'bg' (a background with a subject), 'wm0'..'wm29' (different
    content, one shared watermark banner across the bottom), 'poster' (a named work), 'other'."""
    rng = np.random.default_rng(7)
    banner = textured(rng)[112:, 32:96]  # 1 tile high, 4 tiles wide
    images = {}
    background = textured(rng)
    images["bg"] = background.copy()
    images["bg"][32:96, 32:96] = textured(rng)[32:96, 32:96]
    for i in range(30):
        x = textured(rng)
        x[112:, 32:96] = banner
        images[f"wm{i}"] = x
    images["poster"] = textured(rng)
    images["other"] = textured(rng)
    uris = {k: save(tmp_path / f"{k}.png", v) for k, v in images.items()}
    # generations: a new subject on the training background; new content with the watermark; a part
    # of the poster; unrelated
    g_bg = background.copy()
    g_bg[32:96, 32:96] = textured(rng)[32:96, 32:96]
    g_wm = textured(rng)
    g_wm[112:, 32:96] = banner
    g_poster = textured(rng)
    g_poster[:64] = images["poster"][:64]
    gens = {"g_bg": g_bg, "g_wm": g_wm, "g_poster": g_poster, "g_none": textured(rng)}
    gen_uris = {k: save(tmp_path / f"{k}.png", v) for k, v in gens.items()}
    return uris, gen_uris


def test_check_regions_reads_each_training_image_once_and_records_unreadable_ones(tmp_path, monkeypatch):
    uris, gen_uris = write_world(tmp_path)
    import raymem.regions as regions

    loads = []
    original = regions.load_rgb
    monkeypatch.setattr(
        regions, "load_rgb", lambda uri, size, fetcher=None: loads.append(uri) or original(uri, size, fetcher)
    )
    pairs = {
        "g_bg": (gen_uris["g_bg"], [("bg", uris["bg"]), ("other", uris["other"])]),
        "g_wm": (
            gen_uris["g_wm"],
            [("wm3", uris["wm3"]), ("other", uris["other"]), ("gone", str(tmp_path / "no.png"))],
        ),
        "g_none": (gen_uris["g_none"], [("other", uris["other"]), ("nouri", None)]),
    }
    found = check_regions(pairs, SIZE, GRID, threads=2)
    assert loads.count(uris["other"]) == 1  # shared by three scan images, read once
    assert loads.count(gen_uris["g_wm"]) == 1  # a scan image compared with three training images: decoded once
    by = {u: {e.train_id: e for e in evs} for u, evs in found.items()}
    assert by["g_bg"]["bg"].copied_tiles(T.region_l2, T.region_texture)
    assert by["g_wm"]["wm3"].copied_tiles(T.region_l2, T.region_texture) == tiles_in(range(7, 8), range(2, 6))
    assert by["g_wm"]["gone"].tile_l2 is None and "not_found" in by["g_wm"]["gone"].error
    assert by["g_none"]["nouri"].error == "the training row has no image_uri"
    assert all(not e.copied_tiles(T.region_l2, T.region_texture) for e in by["g_none"].values())
    # a query that is itself a training image (the background sample, training pairs) is fetched as one:
    # through the Fetcher, with its limits -- the scan's own images are read directly
    calls = []
    monkeypatch.setattr(
        regions,
        "load_rgb",
        lambda uri, size, fetcher=None: calls.append((uri, fetcher)) or original(uri, size, fetcher),
    )
    check_regions(
        {("units", "g_bg"): pairs["g_bg"], ("training_pairs", "bg"): (uris["bg"], [("other", uris["other"])])},
        SIZE,
        GRID,
        threads=2,
        training_queries=[("training_pairs", "bg")],
    )
    assert all(f is not None for u, f in calls if u in uris.values()) and [
        f for u, f in calls if u == gen_uris["g_bg"]
    ] == [None]
    # the published table round-trips to the same evidence
    table = region_checks_table("s", found, {"b0": found["g_none"]})
    assert region_evidence(table) == found and region_evidence(table, "background") == {"b0": found["g_none"]}


@pytest.fixture
def labelled_inputs(tmp_path):
    uris, gen_uris = write_world(tmp_path)
    ctx = context(explicit=())
    poster_ctx = context(explicit=(), prompt="the X poster")
    poster_ctx = poster_ctx.__class__(**{**vars(poster_ctx), "prompt_id": "q", "requests_work": True})
    rows = [
        gen(u, i, image(ctx), image_uri=gen_uris[u], clip_prompt_score=0.3)
        for i, u in enumerate(["g_bg", "g_wm", "g_none"])
    ] + nulls(ctx)
    rows.append(gen("g_poster", 0, image(ctx), image_uri=gen_uris["g_poster"], prompt_id="q", parent_prompt_id="q"))

    def low(*ids, entities=()):  # global copy scores far below `replication`
        return [{"train_id": t, "score": 0.2, "image_uri": uris[t], "entities": list(entities)} for t in ids]

    neighbors = {
        "g_bg": {"sscd": low("other", "bg"), "clip": low("bg")},
        "g_wm": {"sscd": low("wm3", "wm17", "other")},
        "g_none": {"sscd": low("other", "poster")},
        "g_poster": {"sscd": low("poster", entities=("X",))},
    }
    inputs = LabelInputs.from_rows(rows, {"p": ctx, "q": poster_ctx}, text_vectors(ctx), neighbors, BG)
    inputs.regions = check_regions(region_check_pairs(inputs, neighbours=3), SIZE, GRID, threads=2)
    return inputs


@pytest.fixture
def labelled(labelled_inputs):
    pairs = region_check_pairs(labelled_inputs, neighbours=3)  # pure: the same pairs the fixture compared
    return pairs, {r["unit_id"]: r for r in label_units(labelled_inputs, T)}


def test_region_pairs_take_the_top_neighbours_of_both_spaces_whatever_their_score(labelled):
    pairs, _ = labelled
    assert [t for t, _ in pairs["g_bg"][1]] == ["other", "bg"]  # copy space first, then CLIP (deduplicated)
    assert set(pairs) == {"g_bg", "g_wm", "g_none", "g_poster"}  # scan images only, never the nulls


def test_a_copied_background_or_watermark_is_MU_region_with_its_evidence(labelled):
    _, out = labelled
    bg, wm = out["g_bg"], out["g_wm"]
    assert (bg["label"], bg["subtype"], bg["region_train_id"]) == ("MU", "region", "bg")
    assert bg["is_MU"] and bg["mu_subtypes"] == ["region"] and "region" in bg["flags"]
    assert len(bg["region_tiles"]) == 48 and bg["region_l2"] <= T.region_l2
    assert "region copy: 48 of 64 tiles of training image 'bg'" in bg["reasons"]
    assert (wm["label"], wm["subtype"], wm["region_tiles"]) == ("MU", "region", tiles_in(range(7, 8), range(2, 6)))
    assert wm["region_train_id"] in ("wm17", "wm3")
    assert out["g_none"]["label"] != "MU" and out["g_none"]["region_train_id"] is None


def test_a_region_of_the_work_the_prompt_names_is_not_MU(labelled):
    _, out = labelled
    poster = out["g_poster"]
    assert poster["label"] != "MU" and not poster["is_MU"] and "requested_region" in poster["flags"]
    assert "region of the requested work" in poster["reasons"]


def test_most_copied_and_the_region_background():
    ev = RegionEvidence("t", 2, (0.05, 0.05, 0.5, 0.5), (0.2, 0.2, 0.2, 0.2))
    assert ev.copied_tiles(0.1, 0.1) == [0, 1]
    assert RegionEvidence("t", 2, None, None, "gone").copied_tiles(0.1, 0.1) == []
    other = RegionEvidence("u", 2, (0.05, 0.5, 0.5, 0.5), (0.2, 0.2, 0.2, 0.2))
    assert most_copied([other, ev], 0.1, 0.1) == (ev, [0, 1])
    assert most_copied([other, ev], 0.01, 0.1) is None
    # the background: per sampled training image, the most tiles it shares with one neighbour
    background = {f"b{i}": [ev if i < 5 else other] for i in range(100)}
    assert background_p99(background, 0.1, 0.1) == pytest.approx(np.percentile([2] * 5 + [1] * 95, 99))
    assert background_p99({"b": [RegionEvidence("t", 2, None, None, "gone")]}, 0.1, 0.1) is None


def test_in_a_world_of_look_alikes_a_shared_layout_is_not_a_region_copy(labelled_inputs):
    """When sampled training images share as many tiles with their own neighbours as a scan image
    shares with its training image, the region is the world's layout, not a copy (like R above the
    train-train p95)."""
    inputs = labelled_inputs
    look = RegionEvidence("x", GRID, (0.05,) * 50 + (0.4,) * 14, (0.2,) * 64)  # 50 shared tiles
    inputs.region_background = {f"b{i}": [look] for i in range(20)}
    out = {r["unit_id"]: r for r in label_units(inputs, T)}
    bg = out["g_bg"]  # 48 copied tiles, fewer than the world's look-alikes share
    assert bg["label"] != "MU" and bg["region_train_id"] is None and bg["region_background_p99"] == 50
    assert "no region copy: 48 of 64 tiles" in bg["reasons"] and "not above it" in bg["reasons"]
    inputs.region_background = {f"b{i}": [RegionEvidence("x", GRID, (0.4,) * 64, (0.2,) * 64)] for i in range(20)}
    out = {r["unit_id"]: r for r in label_units(inputs, T)}
    assert out["g_bg"]["label"] == "MU" and out["g_bg"]["region_background_p99"] == 0
    assert "the region background p99 is 0 tiles" in out["g_bg"]["reasons"]


def test_training_patches_duplicated_in_the_sample_do_not_raise_the_region_background(labelled_inputs):
    """A training set where a fifth of the images share a duplicated patch with another (a backdrop
    reused, a logo pasted: tiles at l2 ~0) and the rest share 3 look-alike tiles: the background is what
    the look-alikes share, and a scan image copying 48 tiles is a region copy. With the duplicates
    counted (region_duplicate_l2 0), the p99 is a twin's share and nothing could exceed it."""
    inputs = labelled_inputs
    twin = RegionEvidence("t", GRID, (0.0,) * 56 + (0.06,) * 2 + (0.4,) * 6, (0.2,) * 64)
    look = RegionEvidence("x", GRID, (0.06,) * 3 + (0.4,) * 61, (0.2,) * 64)
    inputs.region_background = {f"b{i}": [twin if i % 5 == 0 else look] for i in range(100)}
    assert background_p99(inputs.region_background, 0.1, 0.1, 0.025) == 3
    assert background_p99(inputs.region_background, 0.1, 0.1) == pytest.approx(58)
    out = {r["unit_id"]: r for r in label_units(inputs, T)}["g_bg"]
    assert (out["label"], out["subtype"], out["region_background_p99"]) == ("MU", "region", 3)
    assert "(training patches duplicated at l2 <= 0.025 left out)" in out["reasons"]
    counted = {r["unit_id"]: r for r in label_units(inputs, T.model_copy(update={"region_duplicate_l2": 0.0}))}
    assert counted["g_bg"]["label"] != "MU" and counted["g_bg"]["region_background_p99"] == pytest.approx(58)


def test_the_duplicate_level_is_below_the_copy_level():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="region_duplicate_l2 .* must be < region_l2"):
        ThresholdsConfig(region_duplicate_l2=0.1, region_l2=0.1)


def test_breadth_counts_distinct_regions_and_copies_of_one_patch_once():
    def ev(train_id, near: dict[int, float]):  # 16 tiles; the listed ones at the given l2, the rest far
        return RegionEvidence(train_id, 4, tuple(near.get(i, 0.5) for i in range(16)), (0.2,) * 16)

    copy = ev("a", {i: 0.02 for i in range(8)})  # 8 tiles of one training image, nearly exact
    resized = ev("a2", {i: 0.03 for i in range(8)})  # a resized copy of it: provably the same patch
    look1 = ev("b", {i: 0.08 for i in range(6, 14)})  # distinct images resembling the scan image ...
    look2 = ev("c", {i: 0.09 for i in range(6, 14)})  # ... in the same way: 0.08 + 0.09 > 0.1, not provable
    assert region_match([copy], 0.1, 0.1, 2, None) == RegionMatch(copy, list(range(8)), 1, 1)
    assert region_match([copy, resized], 0.1, 0.1, 2, None) == RegionMatch(copy, list(range(8)), 1, 2)
    # "b" shares tiles 6 and 7 with "a" at 0.02 + 0.08 <= 0.1: provably one patch there, one group ...
    assert same_region(copy, look1, list(range(8)), list(range(6, 14)), 0.1, 2)
    assert region_match([copy, look1], 0.1, 0.1, 2, None).breadth == 1
    # ... but not on one common tile (fewer than region_tiles), nor when the sum exceeds region_l2
    assert not same_region(copy, look1, list(range(8)), list(range(7, 14)), 0.1, 2)
    assert region_match([copy, ev("b", {i: 0.09 for i in range(6, 14)})], 0.1, 0.1, 2, None).breadth == 2
    assert not same_region(look1, look2, list(range(6, 14)), list(range(6, 14)), 0.1, 2)
    assert region_match([look1, look2], 0.1, 0.1, 2, None).breadth == 2
    # only the images that would each be a region copy count: above the floor (the region background)
    assert region_match([copy, look1, look2], 0.1, 0.1, 2, 8.0) is not None
    assert region_match([copy, ev("d", {0: 0.01, 1: 0.01})], 0.1, 0.1, 2, 2.0).breadth == 1
    assert region_match([ev("far", {})], 0.1, 0.1, 2, None) is None


def test_copies_of_one_backdrop_reproduced_imperfectly_are_one_region_as_measured():
    """A backdrop in two training images (the same pixels), reproduced at l2 0.07 from each: the sum
    0.14 proves nothing, but the two training images compared with each other are the same pixels on
    those tiles (`training_pairs`), so they are one patch. Two look-alikes 0.05 apart are not."""

    def ev(train_id, near: dict[int, float]):
        return RegionEvidence(train_id, 4, tuple(near.get(i, 0.5) for i in range(16)), (0.2,) * 16)

    a, b = ev("room-1", {i: 0.07 for i in range(10)}), ev("room-2", {i: 0.07 for i in range(10)})
    assert region_match([a, b], 0.1, 0.1, 2, None).breadth == 2  # without the pair: two regions
    same = pair_index({"room-1": [ev("room-2", {i: 0.0 for i in range(12)})]})
    assert region_match([a, b], 0.1, 0.1, 2, None, same, 0.025) == RegionMatch(a, list(range(10)), 1, 2)
    look = pair_index({"room-2": [ev("room-1", {i: 0.05 for i in range(12)})]})  # either way round
    assert region_match([a, b], 0.1, 0.1, 2, None, look, 0.025).breadth == 2
    # the same pixels on fewer tiles than region_tiles at the positions copied from both: not one patch
    one_tile = pair_index({"room-1": [ev("room-2", {0: 0.0})]})
    assert region_match([a, b], 0.1, 0.1, 2, None, one_tile, 0.025).breadth == 2
    assert region_match([a, b], 0.1, 0.1, 2, None, same, 0.0).breadth == 2  # duplicate level 0: off


def test_training_pairs_are_the_compared_images_of_one_scan_image_each_pair_once():
    from raymem.regions import training_pairs

    unit_pairs = {
        "g1": ("g1.png", [("b", "b.png"), ("a", "a.png"), ("c", "c.png")]),
        "g2": ("g2.png", [("b", "b.png"), ("a", "a.png"), ("nouri", None)]),
        "g3": ("g3.png", [("d", "d.png")]),
    }
    assert training_pairs(unit_pairs) == {
        "a": ("a.png", [("b", "b.png"), ("c", "c.png")]),
        "b": ("b.png", [("c", "c.png")]),
    }


def test_a_region_several_distinct_training_images_share_is_a_look_not_MU(labelled_inputs):
    """The scan image resembles its training background tile by tile, and as many tiles of two other,
    distinct training images, each within region_l2 but none provably a copy of another (the distances
    sum past region_l2): no single image's content was copied (breadth 3 > region_breadth 1)."""
    inputs = labelled_inputs
    tiles = {e.train_id: e for e in inputs.regions["g_bg"]}["bg"].copied_tiles(T.region_l2, T.region_texture)
    inputs.regions["g_bg"] = [
        RegionEvidence(name, GRID, tuple(l2 if i in tiles else 0.5 for i in range(64)), (0.2,) * 64)
        for name, l2 in (("bg", 0.06), ("look1", 0.07), ("look2", 0.08))
    ]
    out = {r["unit_id"]: r for r in label_units(inputs, T)}["g_bg"]
    assert out["label"] != "MU" and out["region_train_id"] is None and out["region_breadth"] == 3
    assert "3 distinct training regions match as much (> region_breadth 1)" in out["reasons"]
    wide = {r["unit_id"]: r for r in label_units(inputs, T.model_copy(update={"region_breadth": 3}))}["g_bg"]
    assert (wide["label"], wide["region_train_id"], wide["region_breadth"]) == ("MU", "bg", 3)


def test_a_requested_works_sampled_copies_feed_the_private_mark_rule_alone(labelled_inputs):
    """An image of a prompt that requests a work reproduces a region of a training image that is not the
    work ('bg', its neighbour); the work's sampled copies, compared for private marks and not among the
    image's neighbours, match as many tiles (each a distinct image by the evidence): rules (r) and (d)
    read what the image itself is near, so the copies neither widen the region into a look nor name it."""
    inputs = labelled_inputs
    tiles = {e.train_id: e for e in inputs.regions["g_bg"]}["bg"].copied_tiles(T.region_l2, T.region_texture)

    def evidence(name, l2):
        return RegionEvidence(name, GRID, tuple(l2 if i in tiles else 0.5 for i in range(64)), (0.2,) * 64)

    copies = tuple((f"copy{i}", None) for i in range(3))
    q = inputs.contexts["q"]
    inputs.contexts["q"] = q.__class__(**{**vars(q), "reference": EntityStats(3, None, copies)})
    inputs.neighbors["g_poster"] = {"sscd": [{"train_id": "bg", "score": 0.2, "image_uri": None, "entities": []}]}
    inputs.regions["g_poster"] = [evidence("bg", 0.06), *(evidence(t, 0.07) for t, _ in copies)]
    out = {r["unit_id"]: r for r in label_units(inputs, T)}["g_poster"]
    assert (out["label"], out["region_train_id"], out["region_breadth"]) == ("MU", "bg", 1)
    assert "region copy: 48 of 64 tiles of training image 'bg'" in out["reasons"]
    # the private-mark rule still reads every copy: the three agree everywhere, so no mark
    assert "no private mark: no tile copied from one of the 3 compared copies" in out["reasons"]


def test_a_watermark_shared_by_many_training_images_is_one_region(labelled):
    _, out = labelled
    wm = out["g_wm"]  # the banner is in wm3 and wm17, both compared: one patch, not two regions
    assert wm["region_breadth"] == 1 and "the same patch is in 2 of the compared training images" in wm["reasons"]


# -- private marks on a requested work --------------------------------------------------------------


def test_a_private_mark_is_what_one_copy_carries_and_most_copies_of_the_work_lack():
    """Evidence by hand (4 tiles): tile 3 of copy 'a' is the mark; 'b', 'c', 'd' lack it there."""
    tex = (0.2,) * 4
    near, far = (0.05, 0.05, 0.05, 0.04), (0.05, 0.05, 0.05, 0.40)  # far from the unmarked copies at tile 3
    a, b, c, d = (RegionEvidence(t, 2, l2, tex) for t, l2 in (("a", near), ("b", far), ("c", far), ("d", far)))
    mark = private_mark([a, b, c, d], {"a", "b", "c", "d"}, T.region_l2, T.region_texture)
    assert (mark.train_id, mark.tiles, mark.copies, mark.carriers) == ("a", [3], 4, 1)
    # the same content in a majority of the copies is the work, not a mark
    assert private_mark([a, b, c, d, replace(a, train_id="e")], set("abcde"), T.region_l2, T.region_texture).tiles == [
        3
    ]
    assert not private_mark([a, b, replace(a, train_id="c"), replace(a, train_id="d")], set("abcd"), 0.1, 0.1).tiles
    # an image sitting on the threshold of copies that do not differ (0.09 vs 0.12): nothing provable
    edge = (0.05, 0.05, 0.05, 0.12)
    others = [RegionEvidence(t, 2, edge, tex) for t in "bcd"]
    assert not private_mark([replace(a, tile_l2=(0.05, 0.05, 0.05, 0.09)), *others], set("abcd"), 0.1, 0.1).tiles
    # only the work's copies count, and fewer than three compared copies decide nothing
    assert private_mark([a, b, c, d], {"a", "b"}, T.region_l2, T.region_texture) is None
    assert not private_mark([a, b, c, d], {"b", "c", "d"}, T.region_l2, T.region_texture).tiles


@pytest.fixture
def marked_work(tmp_path):
    """A requested work ('the X poster') with 6 copies on disk, the first two carrying a private mark
    (2 x 2 tiles in the lower-right corner); a scan image reproducing a marked copy and one reproducing
    an unmarked copy (each re-encoded through JPEG, as a generation is never the bytes)."""
    rng = np.random.default_rng(11)
    poster, mark = textured(rng), textured(rng)[:32, :32]
    marked = poster.copy()
    marked[96:, 96:] = mark
    copies = {f"c{i}": save(tmp_path / f"c{i}.png", marked if i < 2 else poster) for i in range(6)}
    gens = {
        "g_marked": save(tmp_path / "g_marked.png", marked, jpeg=85),
        "g_plain": save(tmp_path / "g_plain.png", poster, jpeg=85),
    }
    ctx = context(explicit=(), prompt="the X poster")
    reference = EntityStats(6, None, tuple(sorted(copies.items())))
    ctx = ctx.__class__(**{**vars(ctx), "requests_work": True, "reference": reference})
    rows = [gen(u, i, image(ctx), image_uri=gens[u]) for i, u in enumerate(gens)] + nulls(ctx)

    def top(t):  # a whole-image copy of the work: its top copy-detection neighbour, tagged with it
        return {"sscd": [{"train_id": t, "score": 0.95, "image_uri": copies[t], "entities": ["X"]}]}

    inputs = LabelInputs.from_rows(
        rows, {"p": ctx}, text_vectors(ctx), {"g_marked": top("c0"), "g_plain": top("c5")}, BG
    )
    pairs = with_work_copies(inputs, region_check_pairs(inputs, neighbours=3))
    inputs.regions = check_regions(pairs, SIZE, GRID, threads=2)
    return pairs, {r["unit_id"]: r for r in label_units(inputs, T)}


def test_a_requested_copy_showing_a_private_mark_is_MU_scored_by_the_mark_alone(marked_work):
    pairs, out = marked_work
    assert {t for t, _ in pairs["g_marked"][1]} == {f"c{i}" for i in range(6)}  # every sampled copy compared
    marked, plain = out["g_marked"], out["g_plain"]
    assert (marked["label"], marked["subtype"], marked["mu_subtypes"]) == ("MU", "private_mark", ["private_mark"])
    assert marked["region_tiles"] == tiles_in(range(6, 8), range(6, 8)) and marked["region_train_id"] in ("c0", "c1")
    assert marked["is_ME"] and {"requested_copy", "private_mark"} <= set(marked["flags"])
    assert (
        "private mark: 4 tiles of training image" in marked["reasons"] and "(at most 2 carry it)" in marked["reasons"]
    )
    assert "also ME: the requested work was copied" in marked["reasons"]
    # the same work without the mark is what the user asked for
    assert (plain["label"], plain["subtype"], plain["is_MU"]) == ("ME", "requested_copy", False)
    assert "no private mark: no tile copied from one of the 6 compared copies" in plain["reasons"]


# -- patches the training set repeats -----------------------------------------------------------------


def test_a_patch_two_distinct_training_images_share_as_the_same_pixels_is_a_duplicated_patch():
    """Evidence by hand (8 tiles): training images 'a' and 'b' are the same pixels on tiles 0-1 (a
    logo) and different content elsewhere; the scan image reproduces the logo at l2 0.15 -- past the
    fixed region_l2 (0.1), within its texture-scaled bound at tile std 0.25 (0.25)."""
    tex = (0.25,) * 8
    img_a = RegionEvidence("a", 2, (0.15, 0.15, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5), tex)
    img_b = RegionEvidence("b", 2, (0.14, 0.15, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6), tex)
    pair = RegionEvidence("b", 2, (0.01, 0.02, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4), tex)
    found = duplicated_patch([img_a, img_b], {("a", "b"): pair}, 0.1, 0.1, 0.025, 2)
    assert (found.train_ids, found.tiles, found.l2) == (("a", "b"), [0, 1], 0.15)
    # at the texture floor the bound is region_l2 itself: 0.15 is no copy
    flat = [replace(e, texture=(0.1,) * 8) for e in (img_a, img_b)]
    assert duplicated_patch(flat, {("a", "b"): replace(pair, texture=(0.1,) * 8)}, 0.1, 0.1, 0.025, 2) is None
    # one image twice (nowhere apart) is the whole-image rules' case; an unmeasured pair proves nothing;
    # tiles the two images share only approximately (a look) are no duplicate
    # two images apart only on flat tiles (a sky and a meadow) are still two images
    flat_apart = replace(pair, texture=(0.25, 0.25, *(0.0,) * 6))
    assert duplicated_patch([img_a, img_b], {("a", "b"): flat_apart}, 0.1, 0.1, 0.025, 2).tiles == [0, 1]
    twins = replace(pair, tile_l2=(0.01,) * 8)
    assert duplicated_patch([img_a, img_b], {("a", "b"): twins}, 0.1, 0.1, 0.025, 2) is None
    assert duplicated_patch([img_a, img_b], {}, 0.1, 0.1, 0.025, 2) is None
    alike = replace(pair, tile_l2=(0.06, 0.07, *pair.tile_l2[2:]))
    assert duplicated_patch([img_a, img_b], {("a", "b"): alike}, 0.1, 0.1, 0.025, 2) is None


def test_a_logo_the_training_set_repeats_is_MU_when_reproduced_imperfectly(tmp_path):
    """On disk: two distinct training photos carrying one agency logo (2 x 2 tiles, lower-left); a scan
    image of new content with the logo redrawn with noise (tile l2 ~0.12: no region copy at the fixed
    bound), and one without it. Region checks as the scan runs them, training pairs included."""
    from raymem.regions import training_pairs

    rng = np.random.default_rng(21)
    logo = np.kron(rng.random((8, 8, 3)), np.ones((4, 4, 1))).astype(np.float32)  # contrasted: std ~0.28
    train = {}
    for name in ("s0", "s1"):
        x = textured(rng)
        x[96:, :32] = logo
        train[name] = save(tmp_path / f"{name}.png", x)
    with_logo, without = textured(rng), textured(rng)
    with_logo[96:, :32] = np.clip(logo + rng.normal(0, 0.12, logo.shape), 0, 1)
    gens = {"g_logo": save(tmp_path / "g_logo.png", with_logo), "g_plain": save(tmp_path / "g_plain.png", without)}
    ctx = context(explicit=(), prompt="a photo of X")
    rows = [gen(u, i, image(ctx), image_uri=gens[u]) for i, u in enumerate(gens)] + nulls(ctx)
    low = [{"train_id": t, "score": 0.2, "image_uri": u} for t, u in train.items()]
    inputs = LabelInputs.from_rows(rows, {"p": ctx}, text_vectors(ctx), {u: {"sscd": low} for u in gens}, BG)
    unit_pairs = region_check_pairs(inputs, neighbours=3)
    pairs = {
        **{("units", u): p for u, p in unit_pairs.items()},
        **{("tp", a): p for a, p in training_pairs(unit_pairs).items()},
    }
    found = check_regions(pairs, SIZE, GRID, threads=2, training_queries=[k for k in pairs if k[0] == "tp"])
    inputs.regions = {u: evs for (q, u), evs in found.items() if q == "units"}
    inputs.region_pairs = {a: evs for (q, a), evs in found.items() if q == "tp"}
    assert not any(e.copied_tiles(T.region_l2, T.region_texture) for e in inputs.regions["g_logo"])  # fixed bound
    out = {r["unit_id"]: r for r in label_units(inputs, T)}
    logo_row = out["g_logo"]
    assert (logo_row["label"], logo_row["subtype"], logo_row["region_tiles"]) == (
        "MU",
        "duplicated_patch",
        tiles_in(range(6, 8), range(0, 2)),
    )
    assert "duplicated patch: 4 tiles reproduced that training images 's0' and 's1' carry" in logo_row["reasons"]
    assert out["g_plain"]["label"] != "MU" and not out["g_plain"]["is_MU"]
