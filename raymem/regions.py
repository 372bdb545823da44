"""Region-level copy detection: parts of a training image reproduced in a generation whose whole-image
similarity stays low (a training background behind a new foreground, a watermark or logo shared by
many training images, a private mark).

Every scan image is compared with its nearest training images (the top `signals.region_neighbours`
in the copy-detection space and in CLIP space), whatever their global score: both are resized to
`signals.pixel_size` and cut into `signals.region_grid` x `signals.region_grid` tiles, and each pair of
tiles *at the same position* gets its l2 distance and the texture (pixel standard deviation) of both
tiles. A tile is copied when its l2 is <= `thresholds.region_l2` and both tiles are textured
(std >= `thresholds.region_texture`); an image copies a region of a training image when at least
`thresholds.region_tiles` tiles are copied.

Why texture: two flat tiles of one colour (sky, a plain wall) are close in l2 without any copying. Two
*independent* tiles of std s are ~sqrt(2)*s apart, so with `region_l2` <= `region_texture` a tile
matches only when the two tiles are strongly correlated (rho >= 1 - l2^2 / (2 s^2) = 0.5 at the
defaults), which unrelated content is not. The false-positive rate on independent images is measured
in tests/test_regions.py and docs/labeler.md.

A region copy must come from one training image: when several *distinct* compared training images
each share as many tiles (its breadth, `region_match`; copies of one patch, such as a watermark pasted
into many images, count once), the scan image has a look the world has, not one image's content.

Off by default (`signals.region_neighbours: 0`): docs/labeler.md has the false positives measured on
planted worlds.

A private mark on a requested work (`private_mark`): a copy of the very work the prompt asks for is
what the user expected, but content that only some copies of the work carry (a signature, a phone
number, a stamp on one print of a poster) is not the work. The scan image is compared with a sample of
the work's own training images (`signals.work_copies`, drawn by `raymem.entity_stats` without regard to
the scan image); a tile reproduces such content when it is copied from one copy of the work while a
majority of the compared copies provably differ there (triangle inequality, below).

What this does not find: a region moved or rescaled relative to the training image (same-position tiles
only), and a patch much smaller than a tile (it moves the tile's l2 too little).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from threading import Lock

import numpy as np
import pyarrow as pa

from raymem.duplicates import components
from raymem.fetch import Fetcher, FetchLimits
from raymem.pixels import load_rgb, tile_distances
from raymem.schema import REGION_CHECKS


def scaled_bound(texture: np.ndarray, l2: float, floor: float) -> np.ndarray:
    """Per tile, the l2 within which two tiles of std `texture` are one patch at the correlation the
    defaults ask at the texture floor (rho >= 1 - l2^2 / (2 floor^2): 0.5 at 0.1 / 0.1): `l2` scaled by
    texture / floor. A fixed `l2` asks more of a contrasted tile (at std 0.25, rho >= 0.92): what a
    generator that redraws a logo or a mark at 32 px does not give (measured: docs/planted.md)."""
    return l2 * np.asarray(texture) / floor


def scaled_copied(tile_l2, texture, l2: float, floor: float) -> np.ndarray:
    """Which tiles are copied at the `scaled_bound`: within it, and textured (std >= `floor`) -- per tile
    of one comparison, or per copy and tile of a stack of them."""
    d, s = np.asarray(tile_l2), np.asarray(texture)
    return (d <= scaled_bound(s, l2, floor)) & (s >= floor)


@dataclass(frozen=True)
class RegionEvidence:
    """One scan image against one training image, tile by tile (row-major over the grid)."""

    train_id: str
    grid: int
    tile_l2: tuple[float, ...] | None  # None: an image could not be read
    texture: tuple[float, ...] | None  # per tile, the smaller pixel std of the two tiles
    error: str | None = None

    def copied_tiles(self, l2: float, texture: float, beyond: float | None = None) -> list[int]:
        """Textured tiles within `l2`; with `beyond`, only those farther apart than it (not duplicates)."""
        if self.tile_l2 is None or self.texture is None:
            return []
        d, s = np.asarray(self.tile_l2), np.asarray(self.texture)
        keep = (d <= l2) & (s >= texture) & (d > (beyond if beyond is not None else -1.0))
        return [int(i) for i in np.flatnonzero(keep)]


def tile_stats(a: np.ndarray, b: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile of two (S, S, 3) images in [0, 1], row-major: the l2 distance (Carlini's, as
    `pixels.tile_distances`) and the smaller of the two tiles' spatial pixel standard deviations (within
    each channel, pooled: the quantity the texture argument of the module docstring is about)."""
    s = a.shape[0] // grid

    def texture(x):  # (grid*grid,) spatial pixel std of each tile: within each channel, pooled over the three
        # (a std over pixels *and* channels would count a flat tile of a saturated colour -- a green meadow --
        # as textured: its channels differ, its pixels do not)
        tiles = x[: s * grid, : s * grid].reshape(grid, s, grid, s, 3)
        return np.sqrt(tiles.var(axis=(1, 3)).mean(axis=-1)).reshape(-1)

    return tile_distances(a, b, grid), np.minimum(texture(a), texture(b))


def neighbours_to_compare(
    by_space: Mapping[str, list[dict]], spaces: Iterable[str], per_space: int
) -> list[tuple[str, str | None]]:
    """(train_id, image_uri) of the top `per_space` neighbours of each space, in the order of `spaces`,
    each training image once: the same choice for scan images and for the background sample."""
    seen: dict[str, str | None] = {}
    for space in spaces:
        for n in (by_space.get(space) or [])[:per_space]:
            seen.setdefault(n["train_id"], n.get("image_uri"))
    return list(seen.items())


def compare_regions(a: np.ndarray, b: np.ndarray, train_id: str, grid: int) -> RegionEvidence:
    l2, texture = tile_stats(a, b, grid)
    return RegionEvidence(train_id, grid, tuple(float(x) for x in l2), tuple(float(x) for x in texture))


# decoded query images kept for reuse (a query is compared with each of its training images in turn),
# bounded in bytes: 85 images at the default pixel_size 256, 5,461 at 32
QUERY_CACHE_BYTES = 64 << 20


def check_regions(
    pairs: dict,
    size: int,
    grid: int,
    threads: int = 8,
    limits: FetchLimits | None = None,
    training_queries: Iterable = (),
) -> dict:
    """{query key: (query image uri, [(train_id, training image uri), ...])} -> {query key: evidence}.

    Each training image is fetched once (through `Fetcher`: its limits, retries and statuses) and
    compared with every query that has it as a neighbour; a query is decoded once while it is in use
    (a bounded cache), through the same `Fetcher` when it is itself a training image (the keys in
    `training_queries`: the background sample, training pairs), read directly when it is the scan's own
    image. An unreadable image is recorded with its error, never a failed scan."""
    fetcher = Fetcher(limits or FetchLimits(), threads=threads)
    fetched = set(training_queries)
    users: dict[tuple[str, str | None], list[tuple]] = defaultdict(list)
    for key, (query_uri, neighbours) in pairs.items():
        for train_id, train_uri in neighbours:
            users[(train_id, train_uri)].append((key, query_uri))

    @lru_cache(maxsize=max(8, QUERY_CACHE_BYTES // (size * size * 3 * 4)))
    def decoded(uri: str, is_training: bool) -> np.ndarray:
        return load_rgb(uri, size, fetcher if is_training else None)

    guard, locks = Lock(), defaultdict(Lock)

    def query_image(uri: str, is_training: bool) -> np.ndarray:
        with guard:
            lock = locks[uri]
        with lock:  # two threads wanting one query: the second waits for the first's decode, then hits
            return decoded(uri, is_training)

    def one_training_image(key):
        train_id, train_uri = key
        out = []
        if not train_uri:
            missing = RegionEvidence(train_id, grid, None, None, "the training row has no image_uri")
            return [(uid, missing) for uid, _ in users[key]]
        try:
            b = load_rgb(train_uri, size, fetcher)
        except Exception as err:  # noqa: BLE001 - an unreachable image is evidence missing, not a failed scan
            error = f"{type(err).__name__}: {err}"[:300]
            return [(uid, RegionEvidence(train_id, grid, None, None, error)) for uid, _ in users[key]]
        for uid, query_uri in users[key]:
            try:
                out.append((uid, compare_regions(query_image(query_uri, uid in fetched), b, train_id, grid)))
            except Exception as err:  # noqa: BLE001
                out.append((uid, RegionEvidence(train_id, grid, None, None, f"{type(err).__name__}: {err}"[:300])))
        return out

    evidence: dict[str, list[RegionEvidence]] = defaultdict(list)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for results in pool.map(one_training_image, list(users)):
            for uid, ev in results:
                evidence[uid].append(ev)
    return {uid: sorted(evs, key=lambda e: e.train_id) for uid, evs in evidence.items()}


def training_pairs(
    unit_pairs: Mapping[str, tuple[str, list[tuple[str, str | None]]]],
) -> dict[str, tuple[str, list[tuple[str, str | None]]]]:
    """The training images compared with one scan image, paired with each other (each pair once, the
    smaller id first), in `check_regions`' shape: {train_id: (its uri, [(other train_id, uri), ...])}.
    The breadth test reads from them whether two of a scan image's matches carry one duplicated patch
    (a reused backdrop reproduced imperfectly: its distances to the two copies sum past region_l2, yet
    the copies are the same pixels)."""
    uris: dict[str, str | None] = {}
    others: dict[str, set[str]] = defaultdict(set)
    for _, compared in unit_pairs.values():
        readable = sorted((t, u) for t, u in compared if u)
        uris.update(readable)
        for i, (a, _) in enumerate(readable):
            others[a].update(b for b, _ in readable[i + 1 :])
    return {a: (uris[a], [(b, uris[b]) for b in sorted(bs)]) for a, bs in sorted(others.items()) if bs}


def pair_index(pairs: Mapping[str, list[RegionEvidence]]) -> dict[tuple[str, str], RegionEvidence]:
    """{(smaller train_id, larger train_id): evidence} of the readable `training_pairs` comparisons (built
    once per decision, looked up per scan image)."""
    return {tuple(sorted((a, ev.train_id))): ev for a, evs in pairs.items() for ev in evs if ev.tile_l2 is not None}


def region_checks_table(
    scan_id: str,
    evidence: dict[str, list[RegionEvidence]],
    background: dict[str, list[RegionEvidence]] | None = None,
    pairs: dict[str, list[RegionEvidence]] | None = None,
) -> pa.Table:
    """The published `region_checks` table: every region comparison the scan made, readable or not --
    scan images (`units`), sampled training images against their own neighbours (`background`), and the
    training images compared with one scan image against each other (`training_pairs`)."""
    rows = [
        {
            "scan_id": scan_id,
            "query_set": query_set,
            "unit_id": uid,
            "train_id": ev.train_id,
            "grid": ev.grid,
            "tile_l2": list(ev.tile_l2) if ev.tile_l2 is not None else None,
            "tile_texture": list(ev.texture) if ev.texture is not None else None,
            "error": ev.error,
        }
        for query_set, by_unit in (
            ("units", evidence),
            ("background", background or {}),
            ("training_pairs", pairs or {}),
        )
        for uid, evs in sorted(by_unit.items())
        for ev in evs
    ]
    return pa.Table.from_pylist(rows, schema=REGION_CHECKS)


def region_evidence(table: pa.Table | None, query_set: str = "units") -> dict[str, list[RegionEvidence]]:
    """{unit_id: [evidence]} of one query set from the `region_checks` table (empty for scans published
    without it)."""
    out: dict[str, list[RegionEvidence]] = defaultdict(list)
    if table is None:
        return {}
    for r in table.to_pylist():
        if r["query_set"] != query_set:
            continue
        out[r["unit_id"]].append(
            RegionEvidence(
                r["train_id"],
                r["grid"],
                tuple(r["tile_l2"]) if r["tile_l2"] is not None else None,
                tuple(r["tile_texture"]) if r["tile_texture"] is not None else None,
                r["error"],
            )
        )
    return dict(out)


def most_copied(
    evidence: list[RegionEvidence], l2: float, texture: float, beyond: float | None = None
) -> tuple[RegionEvidence, list[int]] | None:
    """The training image with the most copied tiles (ties: the smaller worst l2, then the id); with
    `beyond`, tiles at or below it are not counted (`RegionEvidence.copied_tiles`)."""
    best = None
    for ev in evidence:
        tiles = ev.copied_tiles(l2, texture, beyond)
        if not tiles:
            continue
        key = (-len(tiles), max(ev.tile_l2[i] for i in tiles), ev.train_id)
        if best is None or key < best[0]:
            best = (key, ev, tiles)
    return (best[1], best[2]) if best else None


@dataclass(frozen=True)
class RegionMatch:
    """A scan image's region copy candidate: the training image with the most copied tiles, and how
    many distinct regions of the compared training images match as much (its breadth)."""

    evidence: RegionEvidence
    tiles: list[int]
    breadth: int  # distinct regions above the floor; provable duplicates of one patch count once
    duplicates: int  # compared training images in the best match's group (a shared watermark: many)


def same_region(
    a: RegionEvidence,
    b: RegionEvidence,
    tiles_a: list[int],
    tiles_b: list[int],
    l2: float,
    min_tiles: int,
    measured: RegionEvidence | None = None,
    duplicate_l2: float = 0.0,
) -> bool:
    """Whether two training images carry one duplicated patch where the scan image matches both, on at
    least `min_tiles` tiles copied from both: provably, when on every one of them the scan image's
    distances to the two sum to <= `l2` (by the triangle inequality the two training tiles are then
    within `l2` of each other: a watermark banner pasted into many images, resized or recompressed
    copies); or as `measured` (the two training images compared with each other, `training_pairs`),
    when at least `min_tiles` of those tiles are the same pixels in both (l2 <= `duplicate_l2`, the
    region background's duplicate level) -- a backdrop reused in many training images and reproduced
    imperfectly, so that the sum exceeds `l2`. Two training images that only resemble the scan image in
    the same way (a look) pass neither."""
    common = sorted(set(tiles_a) & set(tiles_b))
    if len(common) < min_tiles:
        return False
    if all(a.tile_l2[i] + b.tile_l2[i] <= l2 for i in common):
        return True
    if measured is None or measured.tile_l2 is None or duplicate_l2 <= 0:
        return False
    return sum(measured.tile_l2[i] <= duplicate_l2 for i in common) >= min_tiles


def region_match(
    evidence: list[RegionEvidence],
    l2: float,
    texture: float,
    min_tiles: int,
    floor: float | None,
    pairs: Mapping[tuple[str, str], RegionEvidence] | None = None,
    duplicate_l2: float = 0.0,
) -> RegionMatch | None:
    """The most-copied training image (as `most_copied`) and the breadth of the match: the compared
    training images that would each be a region copy (>= `min_tiles` copied tiles, more than `floor`,
    the region background), grouped by `same_region` (with `pairs`, the `training_pairs` the scan compared,
    as `pair_index` keys them), one group per distinct region. A region of one
    training image (or of copies of one patch) has breadth 1; several distinct training images each
    sharing as many tiles is a look the world has, not content copied from one of them."""
    best = most_copied(evidence, l2, texture)
    if best is None:
        return None
    passing = [
        (ev, tiles)
        for ev in evidence
        if len(tiles := ev.copied_tiles(l2, texture)) >= min_tiles and (floor is None or len(tiles) > floor)
    ]

    def one_patch(x, y) -> bool:
        ids = sorted((x[0].train_id, y[0].train_id))
        pair = (pairs or {}).get((ids[0], ids[1]))
        return same_region(x[0], y[0], x[1], y[1], l2, min_tiles, pair, duplicate_l2)

    labels = components(passing, one_patch)
    best_index = next((i for i, (ev, _) in enumerate(passing) if ev is best[0]), None)
    duplicates = labels.count(labels[best_index]) if best_index is not None else 1
    return RegionMatch(best[0], best[1], len(set(labels)), duplicates)


@dataclass(frozen=True)
class PrivateMark:
    """Tiles of a requested work's copy that a scan image reproduces and most copies of the work lack."""

    train_id: str | None  # the copy of the work the tiles were copied from (None: no tile found)
    tiles: list[int]
    l2: float | None  # the largest l2 of the scan image's tiles to that copy's
    copies: int  # compared copies of the work (readable)
    carriers: int  # of them, the most that carry the content of one of the tiles


def private_mark(evidence: list[RegionEvidence], work_ids: set[str], l2: float, texture: float) -> PrivateMark | None:
    """The content of one copy of a requested work that the scan image reproduces and that most compared
    copies of the work lack (`work_ids`: the training images of the work, among `evidence`): no tiles
    when there is none, None when fewer than three copies of the work could be compared.

    A tile counts when it is copied from a copy A of the work (l2 within `scaled_bound` of the tile's
    texture, both tiles textured) and more than half of the compared copies B provably differ from A
    there: d(img, B) - d(img, A) > that bound, so by the triangle inequality A and B are farther apart
    than two tiles of one patch -- not a tile the image sits on the threshold of,
    but content the copies of the work do not share. The work's content is what most of its copies
    show; on exact or near copies of a work with nothing added, no copy's tiles are in a minority.
    A is the copy with the most such tiles (ties: the smaller worst l2, then the id)."""
    work = [ev for ev in evidence if ev.train_id in work_ids and ev.tile_l2 is not None and ev.texture is not None]
    if len(work) < 3:  # a majority that differs needs two copies besides the one copied
        return None
    d = np.asarray([ev.tile_l2 for ev in work])  # (copies, tiles)
    s = np.asarray([ev.texture for ev in work])
    bound = scaled_bound(s, l2, texture)
    copied = scaled_copied(d, s, l2, texture)
    best = None
    for a in range(len(work)):
        differ = (d - d[a] > bound[a]).sum(axis=0)  # per tile: copies provably apart from copy a there
        tiles = np.flatnonzero(copied[a] & (differ > len(work) / 2))
        if not len(tiles):
            continue
        key = (-len(tiles), float(d[a, tiles].max()), work[a].train_id)
        if best is None or key < best[0]:
            best = (key, a, tiles)
    if best is None:
        return PrivateMark(None, [], None, len(work), 0)
    _, a, tiles = best
    return PrivateMark(
        work[a].train_id,
        [int(t) for t in tiles],
        float(d[a, tiles].max()),
        len(work),
        int(copied[:, tiles].sum(axis=0).max()),
    )


@dataclass(frozen=True)
class DuplicatedPatch:
    """Tiles a scan image reproduces that two *distinct* compared training images carry as the same
    pixels: a patch duplicated in the training set (a watermark, an agency's logo, a reused backdrop)."""

    train_ids: tuple[str, str]
    tiles: list[int]
    l2: float  # the largest l2 of the scan image's tiles to either training image's


def duplicated_patch(
    evidence: list[RegionEvidence],
    pairs: Mapping[tuple[str, str], RegionEvidence],
    l2: float,
    texture: float,
    duplicate_l2: float,
    min_tiles: int,
) -> DuplicatedPatch | None:
    """The largest patch the scan image reproduces (each tile within `scaled_bound` of both training
    images' tiles) that two compared training images share as the same pixels (their measured pair,
    `training_pairs`: l2 <= `duplicate_l2`, textured) while they are distinct images (>= `min_tiles`
    tiles apart by more than `l2`, textured or not: whole-image duplicates are the whole-image rules' case).
    Chance look-alikes do not share pixels at a correlation >= 0.97, so a duplicated patch is what the
    training set repeats -- and the generator reproducing it is memorization of that repetition
    (Carlini'23: duplicated data is what is memorized). None when no pair shares such a patch."""
    by_id = {ev.train_id: ev for ev in evidence if ev.tile_l2 is not None and ev.texture is not None}
    best = None
    for a, b in combinations(sorted(by_id), 2):  # the pairs among this image's compared training images
        pair = pairs.get((a, b))
        if pair is None or pair.tile_l2 is None or pair.texture is None:
            continue
        pd, ps = np.asarray(pair.tile_l2), np.asarray(pair.texture)
        # one image twice, not a patch two images share: apart on too few tiles (flat tiles count here --
        # a blue sky and a green meadow are apart without texture; texture guards sameness, not difference)
        if (pd > l2).sum() < min_tiles:
            continue
        same = (pd <= duplicate_l2) & (ps >= texture)
        ea, eb = by_id[a], by_id[b]
        copied = scaled_copied(ea.tile_l2, ea.texture, l2, texture) & scaled_copied(eb.tile_l2, eb.texture, l2, texture)
        tiles = np.flatnonzero(same & copied)
        if len(tiles) < min_tiles:
            continue
        worst = float(np.maximum(ea.tile_l2, eb.tile_l2)[tiles].max())
        key = (-len(tiles), worst, a, b)
        if best is None or key < best[0]:
            best = (key, DuplicatedPatch((a, b), [int(t) for t in tiles], worst))
    return best[1] if best else None


def background_p99(
    background: dict[str, list[RegionEvidence]], l2: float, texture: float, duplicate_l2: float = 0.0
) -> float | None:
    """99th percentile, over the sampled training images, of the most tiles one shares with one of its
    nearest other training images: what distinct training images already share at the same position
    (a class's layout, a world of look-alikes). The 99th, not the 95th: by construction a share q of
    look-alike pairs exceeds the q-quantile, and an MU rule may fire on at most ~1 % of them. None
    without a readable background.

    Tiles the two training images share at l2 <= `duplicate_l2` are one patch duplicated in the training
    set (a watermark pasted into many images, a reused backdrop, a re-encoded copy) and are not counted:
    they are the very thing the rule looks for, not what distinct content shares. With them counted, a
    training set where more than 1 % of images carry a duplicated patch has the p99 of a twin's share,
    and no region copy can exceed it (measured on the planted world with region copies: docs/planted.md)."""
    counts = [
        len(best[1]) if (best := most_copied(evs, l2, texture, duplicate_l2 or None)) else 0
        for evs in background.values()
        if any(e.tile_l2 is not None for e in evs)
    ]
    return float(np.percentile(counts, 99)) if counts else None
