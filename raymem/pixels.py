"""Pixel confirmation of a copy: Carlini et al.'s tiled l2 between a generation and its nearest training image.

Both images are resized to `size` x `size` RGB in [0, 1] and cut into `tiles` x `tiles` tiles; each
tile's distance is sqrt(mean((a - b)^2)). Carlini et al. call a generation extracted when the largest
tile distance is <= 0.15 (on 512 px images, 16 tiles of 128 px): taking the maximum means images that
only share a global colour or background do not match. The share of tiles within the threshold tells a
template copy (Webster's TV: same image except fixed regions) from a full one.

Small images of smooth scenes pass the threshold without being copies (two snowy scenes are within
0.15 everywhere), so a pixel confirmation also has a background, as the copy scores do: sampled
training images against their nearest other training image in the copy space (exact duplicates, and
pairs the labeler counts as near-duplicates of one image, excluded), and a confirmation must come
closer than their 5th percentile (`background_p5`) -- the mirror of "above the train-train p95" for a
distance.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image

from raymem import uri as uris
from raymem.config import MIN_PIXEL_BACKGROUND
from raymem.fetch import Fetcher, FetchLimits
from raymem.schema import PIXEL_CHECKS


class PixelPair(NamedTuple):
    """An image to compare with a training image: a scan image and its copy candidate, or a sampled
    training image and its nearest other training image; `score` is their copy-space cosine."""

    query_uri: str
    train_id: str
    train_uri: str | None
    score: float | None = None


@dataclass(frozen=True)
class PixelEvidence:
    train_id: str
    tile_l2: tuple[float, ...] | None  # None: the training image could not be read
    error: str | None = None
    score: float | None = None  # the pair's copy-space cosine (what chose it)

    @property
    def max_l2(self) -> float | None:
        return max(self.tile_l2) if self.tile_l2 else None

    def share_within(self, threshold: float) -> float | None:
        if not self.tile_l2:
            return None
        return float(np.mean(np.asarray(self.tile_l2) <= threshold))


def load_rgb(uri: str, size: int, fetcher: Fetcher | None = None) -> np.ndarray:
    """An image as (size, size, 3) floats in [0, 1]; training images go through `fetcher` (http(s),
    s3://, local, tar members, with its limits), the scan's own images are read directly."""
    if fetcher is not None:
        fetched = fetcher.fetch(uri)
        if fetched.status != "ok":
            raise OSError(f"{fetched.status}: {fetched.error}")
        data = fetched.data
    else:
        data = uris.read_bytes(uri)
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def tile_distances(a: np.ndarray, b: np.ndarray, tiles: int) -> np.ndarray:
    """(tiles*tiles,) l2 distances of corresponding tiles of two (S, S, 3) images in [0, 1]."""
    s = a.shape[0] // tiles
    d = (a[: s * tiles, : s * tiles] - b[: s * tiles, : s * tiles]) ** 2
    per_tile = d.reshape(tiles, s, tiles, s, 3).mean(axis=(1, 3, 4))
    return np.sqrt(per_tile).reshape(-1)


def compare(
    generated_uri: str,
    train_id: str,
    train_uri: str | None,
    size: int,
    tiles: int,
    fetcher: Fetcher | None = None,
    query_is_training: bool = False,
    score: float | None = None,
) -> PixelEvidence:
    """Tiled l2 of a scan image (read directly) -- or, for the background, a training image (fetched
    with the same limits as the other) -- against a training image."""
    if not train_uri:
        return PixelEvidence(train_id, None, "the training row has no image_uri", score)
    fetcher = fetcher or Fetcher()
    try:
        a = load_rgb(generated_uri, size, fetcher if query_is_training else None)
        b = load_rgb(train_uri, size, fetcher)
    except Exception as err:  # noqa: BLE001 - an unreachable image is evidence missing, not a failed scan
        return PixelEvidence(train_id, None, f"{type(err).__name__}: {err}"[:300], score)
    return PixelEvidence(train_id, tuple(float(x) for x in tile_distances(a, b, tiles)), None, score)


def confirm_pairs(
    pairs: dict[str, tuple],
    size: int,
    tiles: int,
    threads: int = 8,
    limits: FetchLimits | None = None,
    background: dict[str, tuple] | None = None,
) -> tuple[dict[str, PixelEvidence], dict[str, PixelEvidence]]:
    """{unit_id: PixelPair (generated image uri, train_id, training image uri[, score])} -> {unit_id:
    evidence}, and the same for the `background` pairs ({sampled train_id: PixelPair of its image and
    its nearest other training image})."""
    fetcher = Fetcher(limits or FetchLimits(), threads=threads)
    jobs = [("units", pairs), ("background", background or {})]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = {
            (qs, key): pool.submit(
                compare, p.query_uri, p.train_id, p.train_uri, size, tiles, fetcher, qs == "background", p.score
            )
            for qs, chosen in jobs
            for key, p in ((k, PixelPair(*pair)) for k, pair in chosen.items())
        }
        found = {key: f.result() for key, f in futures.items()}
    return tuple({k: ev for (qs, k), ev in found.items() if qs == name} for name, _ in jobs)


def background_p5(
    background: dict[str, PixelEvidence], link: float | None = None, min_pairs: int = MIN_PIXEL_BACKGROUND
) -> float | None:
    """5th percentile of the largest tile l2 between sampled training images and their nearest other
    training image: how close *distinct* training images already come pixel by pixel. Pairs at or above
    `link` in the copy space are near-duplicates of one image by the labeler's own rule and are left
    out: a training set with many near-duplicates (a poster re-encoded 30 times) would otherwise put
    the percentile at a re-encoding's distance and no copy could beat it. None with fewer than
    `min_pairs` readable pairs left (training images unreachable, or nearly all near-duplicates): the
    percentile of a handful is its closest outlier, and the pixel test then stands alone, as without one."""
    values = [
        ev.max_l2
        for ev in background.values()
        if ev.max_l2 is not None and (link is None or ev.score is None or ev.score < link)
    ]
    return float(np.percentile(values, 5)) if values and len(values) >= min_pairs else None


def pixel_checks_table(
    scan_id: str, pixels: dict[str, PixelEvidence], background: dict[str, PixelEvidence] | None = None
) -> pa.Table:
    """The published `pixel_checks` table: every pixel comparison the scan made, readable or not --
    scan images against their copy candidate, and the background sample against its nearest image."""
    rows = [
        {
            "scan_id": scan_id,
            "query_set": query_set,
            "unit_id": uid,
            "train_id": ev.train_id,
            "score": ev.score,
            "tile_l2": list(ev.tile_l2) if ev.tile_l2 is not None else None,
            "error": ev.error,
        }
        for query_set, evidence in (("units", pixels), ("background", background or {}))
        for uid, ev in evidence.items()
    ]
    return pa.Table.from_pylist(rows, schema=PIXEL_CHECKS)
