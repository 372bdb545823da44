"""The nearest-neighbour join: exact top-k of every generated image against the training embeddings.

The training table (Parquet, local or s3://) is streamed by Ray Data in batches of `join.batch_rows`
through an actor pool; each actor holds the query matrices (put once in the object store), scores a
batch with one matrix product per query tile, and returns only the batch's top-k per query. The
driver folds those candidates into a running (Q, k) top-k. Peak memory is bounded by the batch size and
Q * k, never by the number of training rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.errors import InputError
from raymem.schema import TRAIN_REQUIRED, embedding_matrix

log = logging.getLogger(__name__)

SPACE_COLUMNS = {"clip": "clip_embedding", "sscd": "sscd_embedding"}
META_COLUMNS = ("caption", "image_uri", "entities")
# Scores per query tile: bounds the (tile, batch) score matrix to ~256 MiB of float32.
MAX_SCORE_ELEMENTS = 64 * 1024 * 1024


@dataclass
class TrainingTable:
    """What the driver learned from the Parquet footers before streaming."""

    files: list[str]
    dims: dict[str, int]  # space -> embedding dimension
    columns: list[str]
    num_rows: int


def _embedding_dim(source: str, schema: pa.Schema, column: str) -> int | None:
    t = schema.field(column).type
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return None  # checked per batch
    raise InputError(source, f"expected a list of float32, got {t}", field=column)


def inspect_training(uri: str, spaces: dict[str, int]) -> TrainingTable:
    """Validate the training table's files (footers only) against the scan's embedding spaces."""
    try:
        files = uris.list_files(uri, ".parquet")
    except OSError as err:
        raise InputError(uri, f"cannot list training embeddings: {err}") from None
    if not files:
        raise InputError(uri, "no .parquet files found")
    columns: list[str] | None = None
    dims: dict[str, int] = {}
    num_rows = 0
    for path in files:
        fs, p = uris.filesystem(path)
        try:
            meta = pq.read_metadata(p, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise InputError(path, f"not a readable Parquet file: {err}") from None
        schema = meta.schema.to_arrow_schema()
        for name in TRAIN_REQUIRED:
            if name not in schema.names:
                raise InputError(path, "required column is missing", field=name)
        for space, expected in spaces.items():
            col = SPACE_COLUMNS[space]
            if col not in schema.names:
                if space == "clip":
                    raise InputError(path, "required column is missing", field=col)
                continue
            dim = _embedding_dim(path, schema, col)
            if dim is not None and dim != expected:
                raise InputError(
                    path, f"embedding dimension {dim} does not match the scan's {space} model ({expected})", field=col
                )
            dims[space] = expected
        names = [n for n in schema.names if n in ("train_id", *SPACE_COLUMNS.values(), *META_COLUMNS)]
        columns = names if columns is None else [c for c in columns if c in names]
        num_rows += meta.num_rows
    if num_rows == 0:
        raise InputError(uri, "the training table has no rows")
    return TrainingTable(files=files, dims=dims, columns=columns or [], num_rows=num_rows)


@dataclass
class Queries:
    """Query matrices per space, rows aligned with `ids`."""

    ids: list[str]
    matrices: dict[str, np.ndarray]
    exclude_self: bool = False  # background queries: skip the query's own training row


def _to_text(col: pa.Array) -> pa.Array:
    return col if pa.types.is_string(col.type) else col.cast(pa.string())


class TopKScorer:
    """Ray Data callable class: a batch of training rows in, that batch's top-k per query out."""

    def __init__(self, queries_ref, k: int):
        import ray
        import torch

        queries = ray.get(queries_ref) if isinstance(queries_ref, ray.ObjectRef) else queries_ref
        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available() if ray.is_initialized() else False
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        self.k = k
        self.query_sets = [
            (
                qs_name,
                {s: torch.from_numpy(np.array(m, dtype=np.float32)).to(self.device) for s, m in qs.matrices.items()},
                qs.exclude_self,
            )
            for qs_name, qs in queries.items()
        ]

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        train_ids = _to_text(batch.column("train_id").combine_chunks())
        n = batch.num_rows
        out = []
        for qs_name, mats, exclude_self in self.query_sets:
            for space, q in mats.items():
                col = SPACE_COLUMNS[space]
                if col not in batch.column_names:
                    continue
                try:
                    x = embedding_matrix(batch.column(col))
                except ValueError as err:
                    path = batch.column("path")[0].as_py() if "path" in batch.column_names else "training table"
                    raise InputError(path, str(err), field=col) from None
                if x.shape[1] != q.shape[1]:
                    path = batch.column("path")[0].as_py() if "path" in batch.column_names else "training table"
                    raise InputError(
                        path, f"embedding dimension {x.shape[1]} does not match the scan's ({q.shape[1]})", field=col
                    )
                xt = torch.from_numpy(x).to(self.device)
                k = min(self.k + (1 if exclude_self else 0), n)
                tile = max(1, MAX_SCORE_ELEMENTS // max(1, n))
                for start in range(0, q.shape[0], tile):
                    scores = q[start : start + tile] @ xt.T
                    vals, idx = torch.topk(scores, k, dim=1)
                    vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
                    rows = np.repeat(np.arange(start, start + vals.shape[0], dtype=np.int32), k)
                    out.append((qs_name, space, rows, vals.reshape(-1), idx.reshape(-1)))
        return _candidates_table(batch, train_ids, out)


def _candidates_table(batch: pa.Table, train_ids: pa.Array, parts) -> pa.Table:
    if not parts:
        return pa.table({"query_set": pa.array([], pa.string())})
    take = np.concatenate([p[4] for p in parts])
    cols = {
        "query_set": pa.array(np.concatenate([np.full(len(p[2]), p[0], dtype=object) for p in parts]), pa.string()),
        "space": pa.array(np.concatenate([np.full(len(p[2]), p[1], dtype=object) for p in parts]), pa.string()),
        "query": pa.array(np.concatenate([p[2] for p in parts]), pa.int32()),
        "score": pa.array(np.concatenate([p[3] for p in parts]).astype(np.float32)),
        "train_id": train_ids.take(pa.array(take)),
    }
    for name in META_COLUMNS:
        if name in batch.column_names:
            col = batch.column(name).combine_chunks().take(pa.array(take))
            cols[name] = _to_text(col) if name != "entities" else col
    return pa.table(cols)


@dataclass
class RunningTopK:
    """Per-query top-k kept on the driver: (Q, k) scores plus the rows' metadata."""

    num_queries: int
    k: int
    scores: np.ndarray = field(init=False)
    rows: list[list[dict]] = field(init=False)

    def __post_init__(self):
        self.scores = np.full((self.num_queries, self.k), -np.inf, dtype=np.float32)
        self.rows = [[] for _ in range(self.num_queries)]

    def add(self, query: np.ndarray, score: np.ndarray, meta: list[dict], exclude: list[str] | None = None) -> None:
        order = np.argsort(query, kind="stable")
        query, score = query[order], score[order]
        meta = [meta[i] for i in order]
        bounds = np.flatnonzero(np.diff(query)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(query)]):
            q = int(query[start])
            merged = self.rows[q] + [
                {**meta[i], "score": float(score[i])}
                for i in range(start, stop)
                if exclude is None or meta[i]["train_id"] != exclude[q]
            ]
            # Highest score first; ties broken by train_id so results never depend on batch order.
            merged.sort(key=lambda r: (-r["score"], r["train_id"]))
            self.rows[q] = merged[: self.k]
            if self.rows[q]:
                self.scores[q, : len(self.rows[q])] = [r["score"] for r in self.rows[q]]


def nearest_neighbours(
    training: TrainingTable,
    queries: dict[str, Queries],
    k: int,
    *,
    batch_rows: int,
    actors: int = 1,
    remote_args: dict | None = None,
    filesystem=None,
) -> dict[str, dict[str, RunningTopK]]:
    """Exact top-k for every query set and space: {query_set: {space: RunningTopK}}."""
    import ray

    columns = [
        "train_id",
        *[SPACE_COLUMNS[s] for s in training.dims],
        *[c for c in META_COLUMNS if c in training.columns],
    ]
    queries_ref = ray.put(queries)
    ds = ray.data.read_parquet(training.files, filesystem=filesystem, include_paths=True).select_columns(
        [*columns, "path"]
    )
    candidates = ds.map_batches(
        TopKScorer,
        fn_constructor_kwargs={"queries_ref": queries_ref, "k": k},
        batch_size=batch_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        **(remote_args or {"num_cpus": 1}),
    )
    result = {
        name: {space: RunningTopK(len(qs.ids), k) for space in qs.matrices if space in training.dims}
        for name, qs in queries.items()
    }
    for batch in candidates.iter_batches(batch_format="pyarrow", batch_size=None):
        if batch.num_rows == 0:
            continue
        _fold(batch, queries, result)
    return result


def _fold(batch: pa.Table, queries: dict[str, Queries], result) -> None:
    metas = batch.drop_columns([c for c in ("query_set", "space", "query", "score") if c in batch.column_names])
    meta_rows = metas.to_pylist()
    query_set = batch.column("query_set").to_numpy(zero_copy_only=False)
    space = batch.column("space").to_numpy(zero_copy_only=False)
    query = batch.column("query").to_numpy()
    score = batch.column("score").to_numpy()
    for name in np.unique(query_set):
        for sp in np.unique(space[query_set == name]):
            sel = np.flatnonzero((query_set == name) & (space == sp))
            qs = queries[name]
            result[name][sp].add(
                query[sel], score[sel], [meta_rows[i] for i in sel], exclude=qs.ids if qs.exclude_self else None
            )


def background_sample(training: TrainingTable, n: int, spaces: list[str]) -> Queries | None:
    """Up to `n` training rows, spread over the files, as queries for the train-train background.

    Their nearest neighbour other than themselves gives DCR's background similarity distribution.
    """
    spaces = [s for s in spaces if s in training.dims]
    if not spaces or n <= 0:
        return None
    step = max(1, len(training.files) // n)
    files = training.files[::step][:n]
    per_file = max(1, -(-n // len(files)))
    ids, mats = [], {s: [] for s in spaces}
    for path in files:
        fs, p = uris.filesystem(path)
        pf = pq.ParquetFile(p, filesystem=fs)
        columns = ["train_id", *[SPACE_COLUMNS[s] for s in spaces]]
        batch = next(pf.iter_batches(batch_size=per_file, columns=columns), None)
        if batch is None:
            continue
        ids += _to_text(batch.column("train_id")).to_pylist()
        for s in spaces:
            mats[s].append(embedding_matrix(batch.column(SPACE_COLUMNS[s])))
        if len(ids) >= n:
            break
    if not ids:
        return None
    return Queries(ids=ids[:n], matrices={s: np.concatenate(m)[:n] for s, m in mats.items()}, exclude_self=True)


def entity_frequencies(training: TrainingTable, entities: set[str], filesystem=None) -> dict[str, int]:
    """How many training rows carry each entity tag (streamed; only the `entities` column is read)."""
    import ray

    if "entities" not in training.columns or not entities:
        return {}
    wanted = sorted(entities)

    def count(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        flat = pc.list_flatten(batch.column("entities"))
        counts = pc.value_counts(flat)
        values = counts.field("values").to_pylist()
        totals = dict(zip(values, counts.field("counts").to_pylist()))
        return pa.table({"entity": wanted, "n": [int(totals.get(e, 0)) for e in wanted]})

    ds = ray.data.read_parquet(training.files, filesystem=filesystem).select_columns(["entities"])
    totals = {e: 0 for e in wanted}
    for batch in ds.map_batches(count, batch_format="pyarrow", batch_size=65_536).iter_batches(
        batch_format="pyarrow", batch_size=None
    ):
        for e, n in zip(batch.column("entity").to_pylist(), batch.column("n").to_pylist()):
            totals[e] += n
    return totals
