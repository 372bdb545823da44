"""Breadth and duplication (raymem.duplicates): near-duplicates of one training image count once in the
breadth and together in the duplication, measured with the real SSCD on real image transformations."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from raymem.config import CopyDetectionConfig, ThresholdsConfig
from raymem.duplicates import attach_pair_scores, groups
from raymem.label import Background, LabelInputs, label_units
from tests.test_label import context, gen, image, nulls, text_vectors

T = ThresholdsConfig()


def textured(seed: int, size: int = 256) -> Image.Image:
    """A smooth random colour field with grain and rings: structure enough for SSCD to recognise it."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    arr = np.clip(np.asarray(img, float) + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 20, size // 6))
        d.ellipse([x - r, y - r, x + r, y + r], outline=tuple(int(c) for c in rng.integers(0, 255, 3)), width=3)
    return img


def shapes(seed: int, size: int = 256) -> Image.Image:
    """Flat shapes on a flat background: unrelated to the textured images."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(30, 225, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 20, size // 5))
        shape = d.ellipse if rng.random() < 0.5 else d.rectangle
        shape([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def variants(img: Image.Image, n: int) -> list[Image.Image]:
    """Resized, JPEG-compressed and 90 % crops of one image, as a scraped training set has them."""
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            scale = 0.5 + 0.1 * (i % 7)
            v = img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC)
        elif kind == 1:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=50 + 5 * (i % 9))
            v = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        else:
            m = int(img.width * 0.05) + i % 4
            v = img.crop((m, m, img.width - m, img.height - m))
        out.append(v)
    return out


def nbrs_from(query: np.ndarray, train: dict[str, np.ndarray], k: int) -> list[dict]:
    rows = sorted(
        ({"train_id": tid, "score": float(e @ query), "caption": "x"} for tid, e in train.items()),
        key=lambda r: -r["score"],
    )[:k]
    attach_pair_scores([rows], T.replication, lambda r: train[r["train_id"]])
    return rows


def label_one(nbrs: list[dict], k_list: int, background_p95: float = 0.3) -> dict:
    ctx = context(explicit=())
    rows = [gen("u", 0, image(ctx))] + nulls(ctx)
    background = {"sscd": Background("sscd", background_p95, 100)}
    inputs = LabelInputs.from_rows(rows, {"p": ctx}, text_vectors(ctx), {"u": {"sscd": nbrs}}, background)
    return label_units(inputs, T)[0]


@pytest.fixture(scope="module")
def sscd():
    from raymem.encoders import CopyDetector

    return CopyDetector(CopyDetectionConfig(model="immaculate:sscd", image_size=288), "cpu")


def test_thirty_near_duplicates_of_one_image_are_one_group_and_its_copy_is_MU(sscd):
    base = textured(1)
    copies = variants(base, 30)
    others = [shapes(100 + i) for i in range(15)]
    emb = sscd.encode_images([base, *copies, *others])
    train = {
        "poster": emb[0],
        **{f"dup{i}": emb[1 + i] for i in range(30)},
        **{f"other{i}": e for i, e in enumerate(emb[31:])},
    }
    # the real descriptor puts every variant near the original, and the unrelated scenes far from it
    assert min(float(emb[0] @ e) for e in emb[1:31]) >= T.near_duplicate
    assert max(float(emb[0] @ e) for e in emb[31:]) < T.replication
    generation = sscd.encode_images([variants(base, 2)[1]])[0]  # the model's output: a JPEG of the poster
    nbrs = nbrs_from(generation, train, k=40)
    breadth, duplication, exact = groups(nbrs, T.replication, T.near_duplicate)
    assert (breadth, duplication, exact) == (1, 31, True)
    out = label_one(nbrs, 40)
    assert out["label"] == "MU" and out["eidetic_k"] == 1 and out["duplication"] == 31
    assert "the copied image is 31 time(s) among the 40 neighbours (near-duplicates at 0.750)" in out["reasons"]


def test_a_generation_that_resembles_fifteen_distinct_images_is_a_common_look_not_a_copy():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((64, 17)))[0].T  # orthonormal rows
    generation = basis[0]
    # 15 training images at cosine 0.6 to the generation, 0.36 to each other: distinct images
    train = {f"t{i}": 0.6 * basis[0] + 0.8 * basis[1 + i] for i in range(15)}
    nbrs = nbrs_from(generation, train, k=20)
    assert groups(nbrs, T.replication, T.near_duplicate)[:2] == (15, 1)
    out = label_one(nbrs, 20)
    assert out["label"] != "MU" and out["eidetic_k"] == 15 and "common look" in out["reasons"]
    # the same 15 as near-duplicates of one image (cosine 0.9 to each other): one copied image, MU
    dup = {f"t{i}": 0.6 * basis[0] + 0.8 * (0.97 * basis[1] + 0.243 * basis[2 + i]) for i in range(15)}
    dup = {k: v / np.linalg.norm(v) for k, v in dup.items()}
    nbrs = nbrs_from(generation, dup, k=20)
    out = label_one(nbrs, 20)
    assert out["label"] == "MU" and out["eidetic_k"] == 1 and out["duplication"] == 15


def test_without_pair_scores_only_exact_duplicates_merge():
    nbrs = [
        {"train_id": "a", "score": 0.9, "image_hash": "h"},
        {"train_id": "b", "score": 0.8, "image_hash": "h"},
        {"train_id": "c", "score": 0.7, "image_hash": None},
    ]
    assert groups(nbrs, 0.5, 0.75) == (2, 2, False)
    assert groups([], 0.5, 0.75) == (0, 0, True)


def test_training_images_are_never_grouped_below_what_distinct_ones_already_reach():
    """In a world where distinct training images are 0.9 alike to the descriptor (a 32 px world), a
    pairwise 0.8 says nothing: the images stay distinct, and 15 of them above the threshold is a look."""
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((64, 17)))[0].T
    train = {f"t{i}": 0.6 * basis[0] + 0.8 * (0.9 * basis[1] + 0.436 * basis[2 + i]) for i in range(15)}
    train = {k: v / np.linalg.norm(v) for k, v in train.items()}  # pairwise ~0.8
    nbrs = nbrs_from(basis[0], train, k=20)
    assert label_one(nbrs, 20, background_p95=0.3)["eidetic_k"] == 1  # above the background: one image
    high = label_one(nbrs, 20, background_p95=0.9)
    assert high["eidetic_k"] == 15 and high["label"] != "MU" and "near-duplicates" not in high["reasons"]
