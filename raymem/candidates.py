"""What every search returns: candidate rows (query set, space, query row, score, training row and its
metadata), whether from the exact join or the FAISS indexes, so both fold into one running top-k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raymem.schema import META_COLUMNS, NEIGHBORS, conformed
from raymem.sources import to_text


@dataclass
class Queries:
    """Query matrices per space, rows aligned with `ids`."""

    ids: list[str]
    matrices: dict[str, np.ndarray]
    exclude_self: bool = False  # background queries: skip the query's own training row ...
    hashes: list[str | None] | None = None  # ... and its exact duplicates (same image_hash)
    image_uris: list[str | None] | None = None  # background queries: their own images (two-stage copy detection)


# Every candidate as it leaves a join actor (missing metadata as nulls): one type for every call's output;
# the metadata typed as the published neighbours carry it
CANDIDATES = pa.schema(
    [
        ("query_set", pa.string()),
        ("space", pa.string()),
        ("query", pa.int32()),
        ("score", pa.float32()),
        ("train_id", pa.string()),
        *(NEIGHBORS.field(c) for c in META_COLUMNS),
        ("path", pa.string()),
    ]
)


def candidates_table(batch: pa.Table, parts) -> pa.Table:
    """[(query_set, space, query rows, scores, batch row indices)] -> one candidates table (CANDIDATES:
    metadata the training table lacks as nulls)."""
    if not parts:
        return CANDIDATES.empty_table()
    take = pa.array(np.concatenate([p[4] for p in parts]))
    cols = {
        "query_set": pa.array(np.concatenate([np.full(len(p[2]), p[0], dtype=object) for p in parts]), pa.string()),
        "space": pa.array(np.concatenate([np.full(len(p[2]), p[1], dtype=object) for p in parts]), pa.string()),
        "query": pa.array(np.concatenate([p[2] for p in parts]), pa.int32()),
        "score": pa.array(np.concatenate([p[3] for p in parts]).astype(np.float32)),
        "train_id": to_text(batch.column("train_id")).take(take),
    }
    for name in (*META_COLUMNS, "path"):
        if name in batch.column_names:
            col = batch.column(name).combine_chunks().take(take)
            cols[name] = col if name == "entities" else to_text(col)
    return conformed(pa.table(cols), CANDIDATES)
