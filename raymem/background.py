"""The train-train background (DCR, Somepalli et al.): how similar training images are to each other.

A sample of training rows spread over the files is joined against the whole table; each row's nearest
neighbour other than itself (and other than exact duplicates of itself, by `image_hash`) gives the
similarity a generic look reaches. A copy must score above its p95 to count. `raymem index` computes it
once per index (stored in `_index.json`); a scan over a table without one samples it itself.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

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


def background_from(result: dict[str, RunningTopK]) -> dict[str, dict]:
    """Percentiles of the train-train nearest-neighbour similarity per space."""
    out = {}
    for space, running in result.items():
        top1 = running.scores[:, 0]
        top1 = top1[np.isfinite(top1)]
        if len(top1):
            out[space] = percentiles(top1)
    return out


def percentiles(top1: np.ndarray) -> dict:
    """{n, p50 ... p99} of nearest-neighbour similarities."""
    top1 = np.asarray(top1, np.float64)
    return {"n": int(len(top1)), **{f"p{q}": float(np.percentile(top1, q)) for q in PERCENTILES}}


def background_table(scan_id: str, measured: dict[str, dict], source: str) -> pa.Table:
    """The published `background` table: one row per embedding space (`source` unless a space says)."""
    rows = [
        {"scan_id": scan_id, "space": space, "source": b.get("source", source), **{k: b.get(k) for k in ("n", *_P)}}
        for space, b in measured.items()
    ]
    return pa.Table.from_pylist(rows, schema=BACKGROUND)
