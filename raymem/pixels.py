"""Pixel confirmation of a copy: Carlini et al.'s tiled l2 between a generation and its nearest training image.

Both images are resized to `size` x `size` RGB in [0, 1] and cut into `tiles` x `tiles` tiles; each
tile's distance is sqrt(mean((a - b)^2)). Carlini et al. call a generation extracted when the largest
tile distance is <= 0.15 (on 512 px images, 16 tiles of 128 px): taking the maximum means images that
only share a global colour or background do not match. The share of tiles within the threshold tells a
template copy (Webster's TV: same image except fixed regions) from a full one.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from raymem import uri as uris
from raymem.fetch import Fetcher, FetchLimits
from raymem.schema import PIXEL_CHECKS


@dataclass(frozen=True)
class PixelEvidence:
    train_id: str
    tile_l2: tuple[float, ...] | None  # None: the training image could not be read
    error: str | None = None

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
    generated_uri: str, train_id: str, train_uri: str | None, size: int, tiles: int, fetcher: Fetcher | None = None
) -> PixelEvidence:
    if not train_uri:
        return PixelEvidence(train_id, None, "the training row has no image_uri")
    try:
        a, b = load_rgb(generated_uri, size), load_rgb(train_uri, size, fetcher or Fetcher())
    except Exception as err:  # noqa: BLE001 - an unreachable image is evidence missing, not a failed scan
        return PixelEvidence(train_id, None, f"{type(err).__name__}: {err}"[:300])
    return PixelEvidence(train_id, tuple(float(x) for x in tile_distances(a, b, tiles)))


def confirm_pairs(
    pairs: dict[str, tuple[str, str, str | None]],
    size: int,
    tiles: int,
    threads: int = 8,
    limits: FetchLimits | None = None,
) -> dict[str, PixelEvidence]:
    """{unit_id: (generated image uri, train_id, training image uri)} -> {unit_id: evidence}."""
    fetcher = Fetcher(limits or FetchLimits(), threads=threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = {uid: pool.submit(compare, g, t, u, size, tiles, fetcher) for uid, (g, t, u) in pairs.items()}
        return {uid: f.result() for uid, f in futures.items()}


def pixel_checks_table(scan_id: str, pixels: dict[str, PixelEvidence]) -> pa.Table:
    """The published `pixel_checks` table: every pixel comparison the scan made, readable or not."""
    rows = [
        {
            "scan_id": scan_id,
            "unit_id": uid,
            "train_id": ev.train_id,
            "tile_l2": list(ev.tile_l2) if ev.tile_l2 is not None else None,
            "error": ev.error,
        }
        for uid, ev in pixels.items()
    ]
    return pa.Table.from_pylist(rows, schema=PIXEL_CHECKS)
