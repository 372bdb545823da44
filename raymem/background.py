"""The train-train background (DCR, Somepalli et al.): how similar training images are to each other.

A sample of training rows spread over the files is joined against the whole table; each row's nearest
*distinct* training image gives the similarity a generic look reaches, and a copy must score above its
p95 to count. Distinct: not itself, not an exact duplicate (same `image_hash`), and in the SSCD space not
a near-duplicate either -- a web-scraped set stores many photos again resized, re-encoded or trimmed
(about 30 % of LAION-2B by Webster et al.'s 2023 de-duplication count, as recalled), and counting those
would put the p95 at what a repost scores (0.95-0.99), above every real copy (bench/photo_copies.py:
with 6 of 21 photographs reposted, 7 of 147 edited copies found before this rule, 146 of 147 with it).
So a sampled image's neighbours at or above `thresholds.near_duplicate` (SSCD's 90 %-precision copy
score) are passed over when there are at most `eidetic_k` of them (one image stored a few times); when
more are, everything around it looks alike to the descriptor (32-px drawings do) and its nearest one
stays its background, as a common look must.
`raymem index` computes it once per index with the default thresholds (stored in `_index.json` with
the link and limit it used); a scan whose thresholds differ, or over a table without one, samples it
itself.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raymem.config import ThresholdsConfig
from raymem.join import Queries, RunningTopK
from raymem.schema import BACKGROUND, SPACE_COLUMNS
from raymem.sources import TrainingTable, checked_matrix, source_for, to_text

PERCENTILES = (50, 75, 90, 95, 99)
_P = tuple(f"p{q}" for q in PERCENTILES)


def background_sample(training: TrainingTable, n: int, spaces: list[str]) -> Queries | None:
    """Up to `n` training rows, spread over the files, as queries that must not match themselves."""
    spaces = [s for s in spaces if s in training.dims]
    if not spaces or n <= 0:
        return None
    parts = source_for(training.layout).sample(training, n, spaces)
    if not parts:
        return None
    ids = [i for t in parts for i in to_text(t.column("train_id")).to_pylist()]
    hashes = [h for t in parts for h in t.column("image_hash").to_pylist()]
    image_uris = [u for t in parts for u in to_text(t.column("image_uri")).to_pylist()]
    matrices = {
        s: np.concatenate([checked_matrix(t, SPACE_COLUMNS[s], training.dims[s]) for t in parts])[:n] for s in spaces
    }
    return Queries(ids=ids[:n], matrices=matrices, exclude_self=True, hashes=hashes[:n], image_uris=image_uris[:n])


# neighbours a background query keeps: enough to see a near-duplicate group of `eidetic_k` and the next image
NEIGHBOURS = 20


def distinct_link(space: str, t: ThresholdsConfig) -> float | None:
    """The cosine at or above which a training image's neighbour is its near-duplicate, not a distinct
    image: SSCD's published copy score; CLIP has none (its nearest other image counts)."""
    return t.near_duplicate if space == "sscd" else None


def distinct_nearest(scores: np.ndarray, link: float | None, group_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(nearest distinct score, whether near-duplicates were passed over) per row of `scores` (each
    sampled image's neighbours, best first; -inf or NaN where none). A row's near-duplicates are passed
    over only when there are at most `group_limit` of them and a neighbour below the link is in view;
    otherwise (a look many images share, or too few neighbours kept to tell) its nearest counts."""
    scores = np.where(np.isnan(scores), -np.inf, np.asarray(scores, np.float64))
    top1 = scores[:, 0].copy()
    if link is None or scores.shape[1] == 0:
        return top1, np.zeros(len(scores), bool)
    above = (scores >= link).sum(axis=1)
    kept = np.isfinite(scores).sum(axis=1)
    duplicated = (above > 0) & (above <= group_limit) & (above < kept)
    nxt = scores[np.arange(len(scores)), np.minimum(above, scores.shape[1] - 1)]
    top1[duplicated] = nxt[duplicated]
    return top1, duplicated


def background_from(result: dict[str, RunningTopK], t: ThresholdsConfig) -> dict[str, dict]:
    """Percentiles of the train-train nearest-distinct similarity per space."""
    return {
        space: measured
        for space, running in result.items()
        if (measured := distinct_percentiles(running.scores, distinct_link(space, t), t.eidetic_k)) is not None
    }


def distinct_percentiles(scores: np.ndarray, link: float | None, group_limit: int) -> dict | None:
    """percentiles() of each row's nearest distinct neighbour (None when no row has one), with the
    share of rows whose near-duplicates were passed over and the link and limit that decided it."""
    top1, duplicated = distinct_nearest(scores, link, group_limit)
    finite = np.isfinite(top1)
    if not finite.any():
        return None
    return {
        **percentiles(top1[finite]),
        "near_duplicated": float(duplicated.mean()),
        "near_duplicate_link": link,
        "group_limit": group_limit,
    }


def percentiles(top1: np.ndarray) -> dict:
    """{n, p50 ... p99} of nearest-neighbour similarities."""
    top1 = np.asarray(top1, np.float64)
    return {"n": int(len(top1)), **{f"p{q}": float(np.percentile(top1, q)) for q in PERCENTILES}}


def stored_background(index_manifest: dict | None, t: ThresholdsConfig) -> dict[str, dict]:
    """The index's precomputed background when it was measured with this scan's near-duplicate link and
    group limit ({} otherwise, and for indexes written before the background passed near-duplicates
    over: the scan then samples its own)."""
    stored = (index_manifest or {}).get("background") or {}
    same = all(
        "group_limit" in b and b.get("near_duplicate_link") == distinct_link(s, t) and b["group_limit"] == t.eidetic_k
        for s, b in stored.items()
    )
    return stored if same else {}


def background_table(scan_id: str, measured: dict[str, dict], source: str) -> pa.Table:
    """The published `background` table: one row per embedding space (`source` unless a space says)."""
    rows = [
        {
            "scan_id": scan_id,
            "space": space,
            "source": b.get("source", source),
            **{k: b.get(k) for k in ("n", *_P, "near_duplicated")},
        }
        for space, b in measured.items()
    ]
    return pa.Table.from_pylist(rows, schema=BACKGROUND)
