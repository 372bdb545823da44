"""Approximate join: one FAISS IVF index per training shard and space, searched shard by shard.

`raymem index --faiss` trains an inner-product IVF-Flat index on each shard (its rows are the index
ids, in shard order) and writes `_faiss/part-NNNNN.<space>.faiss`; it then measures recall@k of this
mode against the exact join on sampled training rows and records it in `_index.json`. A scan with
`join.mode: faiss` searches every shard's index with `join.nprobe` and merges the per-shard top-k like
the exact join does.
"""

from __future__ import annotations

import logging
import math
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.config import FaissConfig
from raymem.errors import InputError

log = logging.getLogger(__name__)


def index_uri(shard_file: str, space: str) -> str:
    parent = posixpath.dirname(shard_file) if uris.is_remote(shard_file) else shard_file.rsplit("/", 1)[0]
    stem = posixpath.basename(shard_file)[: -len(".parquet")]
    return uris.join(parent, "_faiss", f"{stem}.{space}.faiss")


def default_nlist(rows: int) -> int:
    # ~4 sqrt(n) lists, and at least 39 training points per list (FAISS's own minimum).
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39))


def _build_shard(row: dict) -> dict:
    import faiss

    from raymem.schema import SPACE_COLUMNS
    from raymem.sources import checked_matrix, path_column

    path, space, nlist = row["file"], row["space"], row["nlist"]
    fs, p = uris.filesystem(path)
    table = pq.read_table(p, filesystem=fs, columns=["train_id", SPACE_COLUMNS[space]])
    table = table.append_column("path", path_column(path, table.num_rows))
    x = checked_matrix(table, SPACE_COLUMNS[space], row["dim"])
    lists = nlist or default_nlist(len(x))
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    data = faiss.serialize_index(index)
    uris.write_bytes_atomic(index_uri(path, space), data.tobytes())
    return {"file": path, "space": space, "nlist": lists, "rows": len(x)}


def build_indexes(training, cfg: FaissConfig) -> dict:
    import ray

    if training.layout != "parquet":
        raise InputError(training.uri, "FAISS indexes are built on raymem Parquet shards (convert first)")
    items = [
        {"file": f, "space": s, "nlist": cfg.nlist or 0, "dim": d}
        for f in training.files
        for s, d in training.dims.items()
    ]
    start = time.perf_counter()
    built = ray.data.from_items(items, override_num_blocks=len(items)).map(_build_shard).take_all()
    return {
        "spaces": sorted(training.dims),
        "indexes": len(built),
        "build_seconds": round(time.perf_counter() - start, 3),
        "nlist": sorted({b["nlist"] for b in built}),
    }


class FaissShardSearch:
    """Ray Data callable class: a shard in, its IVF top-k per query out (same format as the exact join)."""

    def __init__(self, queries_ref, k: int, nprobe: int):
        import ray

        self.queries = ray.get(queries_ref) if isinstance(queries_ref, ray.ObjectRef) else queries_ref
        self.k, self.nprobe = k, nprobe

    def __call__(self, batch: pa.Table) -> pa.Table:
        import faiss

        from raymem.candidates import candidates_table
        from raymem.schema import META_COLUMNS
        from raymem.sources import path_column

        out = []
        for path in batch.column("file").to_pylist():
            fs, p = uris.filesystem(path)
            names = pq.read_schema(p, filesystem=fs).names
            meta = pq.read_table(p, filesystem=fs, columns=["train_id", *[c for c in META_COLUMNS if c in names]])
            meta = meta.append_column("path", path_column(path, meta.num_rows))
            parts = []
            for name, qs in self.queries.items():
                for space, q in qs.matrices.items():
                    try:
                        data = uris.read_bytes(index_uri(path, space))
                    except FileNotFoundError:
                        raise InputError(index_uri(path, space), "no FAISS index: run `raymem index --faiss`") from None
                    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
                    index.nprobe = self.nprobe
                    k = min(self.k + (1 if qs.exclude_self else 0), meta.num_rows)
                    scores, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), k)
                    found = ids >= 0
                    rows = np.repeat(np.arange(len(q), dtype=np.int32), k)[found.reshape(-1)]
                    parts.append(
                        (name, space, rows, scores.reshape(-1)[found.reshape(-1)], ids.reshape(-1)[found.reshape(-1)])
                    )
            out.append(candidates_table(meta, parts))
        return pa.concat_tables(out, promote_options="permissive") if out else pa.table({})


def faiss_candidates(training, queries_ref, k: int, nprobe: int, actors: int = 1):
    """Per-shard IVF top-k of every query, as candidate batches (an iterator, like the exact join's)."""
    from raymem import runtime

    return runtime.map_stage(
        "join_faiss",
        [{"file": f} for f in training.files],
        FaissShardSearch,
        runtime.StagePlan.fixed(actors, num_gpus=0.0, num_cpus=1.0),
        constructor_kwargs={"queries_ref": queries_ref, "k": k, "nprobe": nprobe},
    )
