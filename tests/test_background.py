"""The train-train background: each sampled image's nearest *distinct* training image (raymem.background)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from raymem.background import background_sample, distinct_nearest, distinct_percentiles, percentiles, stored_background
from raymem.config import IndexConfig, ThresholdsConfig
from raymem.duplicates import attach_pair_scores, read_embeddings, rows_to_read
from raymem.encoders import CopyDetector
from raymem.index import run_index
from raymem.join import Queries, nearest_neighbours
from raymem.label import Background, CopyEvidence, replication_evidence
from raymem.sources import inspect_training

NEG = -np.inf


def test_a_few_near_duplicates_are_passed_over_but_a_common_look_is_not():
    scores = np.array(
        [
            [0.97, 0.93, 0.31, 0.20],  # stored twice more (reposts): its nearest distinct image is 0.31
            [0.40, 0.35, 0.30, 0.20],  # no near-duplicate: its nearest
            [0.90, 0.88, 0.86, 0.84],  # more than group_limit above the link: a look many images share
            [0.99, NEG, NEG, NEG],  # only a near-duplicate in view: a group or a look, it cannot tell
        ]
    )
    top1, duplicated = distinct_nearest(scores, link=0.75, group_limit=3)
    np.testing.assert_allclose(top1, [0.31, 0.40, 0.90, 0.99])  # the last two as before: their nearest
    assert duplicated.tolist() == [True, False, False, False]
    # CLIP has no published near-duplicate score: the nearest other image counts, whatever it is
    top1, duplicated = distinct_nearest(scores, link=None, group_limit=3)
    np.testing.assert_allclose(top1, [0.97, 0.40, 0.90, 0.99])
    assert not duplicated.any()
    measured = distinct_percentiles(scores, 0.75, 3)
    assert measured["n"] == 4 and measured["near_duplicated"] == 0.25 and measured["p50"] == pytest.approx(0.65)
    assert distinct_percentiles(np.full((2, 3), NEG), 0.75, 3) is None


def test_an_index_background_serves_only_a_scan_with_the_same_link_and_limit():
    t = ThresholdsConfig()
    measured = {"n": 9, "p95": 0.3, "near_duplicate_link": t.near_duplicate, "group_limit": t.eidetic_k}
    index = {"background": {"sscd": measured, "clip": {**measured, "near_duplicate_link": None}}}
    assert stored_background(index, t) == index["background"]
    assert stored_background(index, t.model_copy(update={"near_duplicate": 0.8})) == {}
    assert stored_background(index, t.model_copy(update={"eidetic_k": 5})) == {}
    old = {"background": {"sscd": {"n": 9, "p95": 0.98}}}  # written before near-duplicates were passed over
    assert stored_background(old, t) == {} and stored_background(None, t) == {}


def _photographs() -> dict[str, Image.Image]:
    from skimage import data

    names = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "moon", "immunohistochemistry")
    out = {}
    for name in names:
        a = np.asarray(getattr(data, name)())
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        out[name] = Image.fromarray(a).resize((288, 288))
    return out


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.ray
def test_reposted_photographs_do_not_raise_the_background_above_their_copies(local_ray, demo_root, tmp_path):
    """Real SSCD on real photographs (scikit-image's): a web-scraped set stores some photos again
    (resized, re-encoded, trimmed). Counted as distinct images, those reposts put the background p95 at
    what a repost scores, above a JPEG copy of the photo; passed over, the copy is found."""
    photos = _photographs()
    reposted = ("astronaut", "coffee", "rocket")
    folder = tmp_path / "images"
    folder.mkdir()
    for name, im in photos.items():
        im.save(folder / f"{name}.png")
        if name in reposted:
            im.resize((200, 200)).save(folder / f"{name}-resized.png")
            _jpeg(im, 70).save(folder / f"{name}-jpeg.jpg")
            im.crop((6, 6, 282, 282)).save(folder / f"{name}-trim.png")
    out = tmp_path / "index"
    cfg = IndexConfig.model_validate(
        {
            "input": {"kind": "folder", "path": str(folder)},
            "output": str(out),
            "embedding": {
                "clip": {"model": f"local-dir:{demo_root / 'clip-tiny'}", "pretrained": None},
                "copy_detection": {"model": "immaculate:sscd", "image_size": 288},
            },
            "background_sample": 100,
        }
    )
    run_index(cfg)
    background = json.loads((out / "_index.json").read_text())["background"]["sscd"]
    assert background["n"] == 17 and background["near_duplicated"] == pytest.approx(12 / 17)
    assert background["p95"] < 0.5 and background["group_limit"] == ThresholdsConfig().eidetic_k

    training = inspect_training(str(out), {})
    detector = CopyDetector(cfg.embedding.copy_detection)
    copy = detector.encode_images([_jpeg(photos["coffee"], 30)])
    neighbours = nearest_neighbours(training, {"q": Queries(ids=["copy"], matrices={"sscd": copy})}, 20)
    rows = neighbours["q"]["sscd"].rows[0]
    t = ThresholdsConfig()
    embeddings = read_embeddings("sscd_embedding", rows_to_read([rows], t.replication))  # as the scan reads them
    attach_pair_scores([rows], t.replication, lambda r: embeddings.get((r.get("path"), str(r["train_id"]))))

    def verdict(p95: float):
        evidence = CopyEvidence("sscd", "sscd", None, Background("sscd", p95, background["n"]))
        return replication_evidence(evidence, rows, None, None, t, None)

    found = verdict(background["p95"])
    assert (
        found.replicated
        and found.breadth == 1
        and found.duplication == 4
        and found.top["train_id"].startswith("coffee")
    )
    # the background as it was (the nearest other image, reposts counted as distinct): the copy is lost under it
    sample = background_sample(training, 100, ["sscd"])
    nearest = nearest_neighbours(training, {"background": sample}, 1)["background"]["sscd"].scores[:, 0]
    naive = percentiles(nearest)["p95"]
    assert naive > found.score > background["p95"] and not verdict(naive).replicated
