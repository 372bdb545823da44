"""The unit store and the text cache: work kept across scans so a re-run computes only what is missing.

Rows are keyed by `unit_id`, which hashes the model weights, the generation and embedding settings, the
prompt row and the seed; a unit computed by any earlier scan of the same output root is reused. Each
work chunk is one Parquet file written atomically by the actor that computed it, so a crash loses at
most the chunks in flight. When a unit has several rows (a retried failure), the newest one wins.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.schema import STATUS_OK, embedding_matrix

log = logging.getLogger(__name__)


class UnitStore:
    def __init__(self, root: str):
        self.root = root
        self.generations = uris.join(root, "generations")

    def status(self, unit_ids: set[str]) -> dict[str, str]:
        """Latest status of each of `unit_ids` that the store holds."""
        latest: dict[str, tuple[int, str]] = {}
        for path in uris.list_files(self.generations, ".parquet"):
            t = read_part(path, ["unit_id", "status", "computed_at"])
            if t is None:
                continue
            ids = t.column("unit_id").to_pylist()
            statuses = t.column("status").to_pylist()
            times = t.column("computed_at").cast(pa.int64()).to_pylist()
            for uid, status, ts in zip(ids, statuses, times):
                if uid in unit_ids and (uid not in latest or ts >= latest[uid][0]):
                    latest[uid] = (ts, status)
        return {uid: status for uid, (_, status) in latest.items()}

    def rows(self, unit_ids: set[str]) -> pa.Table | None:
        """The newest row of each unit in `unit_ids`, as one table."""
        return newest_rows(self.generations, "unit_id", unit_ids)


def read_part(path: str, columns: list[str] | None = None) -> pa.Table | None:
    """One file of a store or cache; None (and a warning) for a torn file from a killed writer."""
    fs, p = uris.filesystem(path)
    try:
        return pq.read_table(p, filesystem=fs, columns=columns)
    except (OSError, pa.ArrowInvalid) as err:
        log.warning("skipping unreadable %s: %s", path, err)
        return None


def newest_rows(root: str, key: str, wanted: set[str]) -> pa.Table | None:
    """The newest row (by `computed_at`) of each `key` value in `wanted`, from every Parquet file under
    `root` (a unit store or a cache: one file per writer call); torn files are skipped."""
    parts = []
    values = pa.array(sorted(wanted), pa.string())
    for path in uris.list_files(root, ".parquet"):
        t = read_part(path)
        if t is None:
            continue
        t = t.filter(pc.is_in(t.column(key), value_set=values))
        if t.num_rows:
            parts.append(t)
    if not parts:
        return None
    table = pa.concat_tables(parts, promote_options="permissive")
    order = pc.sort_indices(table, [(key, "ascending"), ("computed_at", "descending")])
    table = table.take(order)
    ids = table.column(key).to_pylist()
    keep = [i for i, uid in enumerate(ids) if i == 0 or uid != ids[i - 1]]
    return table.take(pa.array(keep, pa.int64()))


class TextCache:
    """CLIP embeddings of probe texts, per CLIP model (`clip=<hash of embedding.clip>`)."""

    def __init__(self, root: str):
        self.root = root

    def embeddings(self, texts: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for path in uris.list_files(self.root, ".parquet"):
            t = read_part(path)
            if t is None:
                continue
            matrix = embedding_matrix(t.column("clip_embedding"))
            for i, text in enumerate(t.column("text").to_pylist()):
                if text in texts:
                    found[text] = matrix[i]
        return found


def ok_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("status"), STATUS_OK))
