"""The nearest-neighbour join: top-k of every generated image against the training embeddings.

Exact mode streams the training table (raymem Parquet, or the clip-retrieval / LAION layout
`img_emb/img_emb_N.npy` + `metadata/metadata_N.parquet` read in place; local or s3://) through a Ray
Data actor pool, sharded by Parquet fragment: work items of consecutive row groups (~`join.batch_rows`
rows) that each actor reads itself, so embeddings never cross the object store. An actor holds the
query matrices (put once in the object store), reads the next item in a thread while it scores the
current one with one matrix product per query tile (numpy sgemm on CPUs, torch on its GPU when Ray
gave it one), checks the embeddings (dimension, NaN/inf, zero norm), and returns only the item's
top-k per query. The driver folds candidates into a running (Q, k) top-k with vectorised sorts.
Peak memory is bounded by the item size and Q * k, never by the number of training rows.

FAISS mode searches per shard the IVF indexes `raymem index --faiss` built next to the shards, and
merges the per-shard top-k the same way: approximate, with recall measured at index time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymem import runtime
from raymem import uri as uris
from raymem.errors import InputError
from raymem.schema import TRAIN_REQUIRED, embedding_matrix

log = logging.getLogger(__name__)

SPACE_COLUMNS = {"clip": "clip_embedding", "sscd": "sscd_embedding"}
META_COLUMNS = ("caption", "image_uri", "entities", "image_hash")
CLIP_RETRIEVAL = "clip-retrieval:"
INDEX_MANIFEST = "_index.json"
# Scores per query tile: bounds the (tile, batch) score matrix to ~256 MiB of float32.
MAX_SCORE_ELEMENTS = 64 * 1024 * 1024


@dataclass
class TrainingTable:
    """What the driver learned from the files' footers/headers before streaming."""

    uri: str
    files: list[str]  # Parquet files (clip-retrieval: the metadata files)
    dims: dict[str, int]  # space -> embedding dimension
    columns: list[str]
    num_rows: int
    layout: str = "parquet"  # parquet | clip-retrieval
    embedding_files: list[str] = field(default_factory=list)  # clip-retrieval: img_emb_N.npy, aligned
    skipped: list[str] = field(default_factory=list)  # "path: why", for files skipped as unreadable
    index: dict | None = None  # _index.json of a `raymem index` output, when present
    row_groups: list[list[int]] = field(default_factory=list)  # rows per row group (clip-retrieval: per file)


def _embedding_dim(source: str, schema: pa.Schema, column: str) -> int | None:
    t = schema.field(column).type
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return None  # checked per batch
    raise InputError(source, f"expected a list of float32, got {t}", field=column)


def _read_index_manifest(uri: str) -> dict | None:
    if uris.is_remote(uri) or uris.is_dir(uri):
        path = uris.join(uri, INDEX_MANIFEST)
        if uris.exists(path):
            return json.loads(uris.read_bytes(path))
    return None


def inspect_training(uri: str, spaces: dict[str, int], *, skip_bad_files: bool = False) -> TrainingTable:
    """Validate the training table (footers and headers only) against the scan's embedding spaces."""
    if uri.startswith(CLIP_RETRIEVAL):
        from raymem.laion import inspect_clip_retrieval

        return inspect_clip_retrieval(uri[len(CLIP_RETRIEVAL) :], spaces)
    try:
        files = uris.list_files(uri, ".parquet")
    except OSError as err:
        raise InputError(uri, f"cannot list training embeddings: {err}") from None
    if not files:
        raise InputError(uri, "no .parquet files found")
    columns: list[str] | None = None
    dims: dict[str, int] = {}
    num_rows = 0
    good, skipped, row_groups = [], [], []
    for path in files:
        fs, p = uris.filesystem(path)
        try:
            meta = pq.read_metadata(p, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as err:
            if skip_bad_files:
                log.warning("skipping unreadable training file %s: %s", path, err)
                skipped.append(f"{path}: {err}")
                continue
            raise InputError(path, f"not a readable Parquet file: {err}") from None
        schema = meta.schema.to_arrow_schema()
        for name in TRAIN_REQUIRED:
            if name not in schema.names:
                raise InputError(path, "required column is missing", field=name)
        for space, col in SPACE_COLUMNS.items():
            if col not in schema.names:
                if space == "clip":
                    raise InputError(path, "required column is missing", field=col)
                continue
            dim = _embedding_dim(path, schema, col)
            expected = spaces.get(space)
            if dim is not None and expected is not None and dim != expected:
                raise InputError(
                    path, f"embedding dimension {dim} does not match the scan's {space} model ({expected})", field=col
                )
            if dims.get(space) not in (None, dim or expected):
                raise InputError(
                    path, f"embedding dimension {dim} differs from the other files' ({dims[space]})", field=col
                )
            if dim or expected:
                dims[space] = dim or expected
        names = [n for n in schema.names if n in ("train_id", *SPACE_COLUMNS.values(), *META_COLUMNS)]
        columns = names if columns is None else [c for c in columns if c in names]
        num_rows += meta.num_rows
        good.append(path)
        row_groups.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    if num_rows == 0:
        raise InputError(uri, "the training table has no rows")
    # An optional column (sscd_embedding) is only usable when every file has it, and only the scan's
    # spaces are joined (when the scan names them).
    dims = {s: d for s, d in dims.items() if SPACE_COLUMNS[s] in (columns or []) and (not spaces or s in spaces)}
    return TrainingTable(
        uri=uri,
        files=good,
        dims=dims,
        columns=columns or [],
        num_rows=num_rows,
        skipped=skipped,
        index=_read_index_manifest(uri),
        row_groups=row_groups,
    )


@dataclass
class Queries:
    """Query matrices per space, rows aligned with `ids`."""

    ids: list[str]
    matrices: dict[str, np.ndarray]
    exclude_self: bool = False  # background queries: skip the query's own training row ...
    hashes: list[str | None] | None = None  # ... and its exact duplicates (same image_hash)


def _to_text(col) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col if pa.types.is_string(col.type) else col.cast(pa.string())


def _batch_source(batch: pa.Table) -> str:
    return batch.column("path")[0].as_py() if "path" in batch.column_names and batch.num_rows else "training table"


def checked_matrix(batch: pa.Table, column: str, dim: int) -> np.ndarray:
    """The batch's embeddings as (n, dim), L2-normalised; bad values are a one-line error naming the file."""
    source = _batch_source(batch)
    try:
        x = embedding_matrix(batch.column(column))
    except (ValueError, TypeError) as err:
        raise InputError(source, str(err), field=column) from None
    if x.shape[1] != dim:
        raise InputError(source, f"embedding dimension {x.shape[1]} does not match the scan's ({dim})", field=column)
    sq = np.einsum("ij,ij->i", x, x)
    bad = np.flatnonzero(~np.isfinite(sq) | (sq <= 0))
    if len(bad):
        i = int(bad[0])
        what = "is zero" if np.isfinite(sq[i]) else "has NaN or inf values"
        tid = _to_text(batch.column("train_id"))[i].as_py()
        raise InputError(source, f"the embedding of train_id '{tid}' {what} ({len(bad)} bad row(s))", field=column)
    if np.abs(sq - 1.0).max() > 1e-3:  # not normalised: make the scores cosines
        x = x / np.sqrt(sq)[:, None]
    return np.ascontiguousarray(x, dtype=np.float32)


class TopKScorer:
    """Ray Data callable class: a batch of training rows in, that batch's top-k per query out."""

    def __init__(self, queries_ref, k: int, threads: int = 1):
        import ray
        import torch

        queries = ray.get(queries_ref) if isinstance(queries_ref, ray.ObjectRef) else queries_ref
        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available() if ray.is_initialized() else False
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        self.threads = threads
        self.k = k

        def place(m):
            m = np.ascontiguousarray(m, dtype=np.float32)
            return torch.from_numpy(m).to(self.device) if gpu else m

        self.query_sets = [
            (name, {s: place(m) for s, m in qs.matrices.items()}, self._self_keys(qs)) for name, qs in queries.items()
        ]

    @staticmethod
    def _self_keys(qs: Queries) -> dict[str, list[int]] | None:
        """For background queries: id or image hash -> the query rows that must not match it."""
        if not qs.exclude_self:
            return None
        keys: dict[str, list[int]] = {}
        for i, (tid, h) in enumerate(zip(qs.ids, qs.hashes or [None] * len(qs.ids))):
            keys.setdefault(f"id:{tid}", []).append(i)
            if h:
                keys.setdefault(f"hash:{h}", []).append(i)
        return keys

    def _masks(self, batch: pa.Table, keys: dict[str, list[int]]) -> list[tuple[int, int]]:
        """(query row, batch row) pairs to exclude: the query itself and exact duplicates of it."""
        pairs = []
        ids = _to_text(batch.column("train_id")).to_pylist()
        hashes = batch.column("image_hash").to_pylist() if "image_hash" in batch.column_names else [None] * len(ids)
        for j, (tid, h) in enumerate(zip(ids, hashes)):
            for key in (f"id:{tid}", f"hash:{h}" if h else None):
                for qi in keys.get(key, ()) if key else ():
                    pairs.append((qi, j))
        return pairs

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        parts = []
        for name, mats, self_keys in self.query_sets:
            masks = self._masks(batch, self_keys) if self_keys is not None else []
            for space, q in mats.items():
                col = SPACE_COLUMNS[space]
                if col not in batch.column_names or n == 0:
                    continue
                x = checked_matrix(batch, col, q.shape[1])
                k = min(self.k, n)
                tile = max(1, MAX_SCORE_ELEMENTS // n)
                for start in range(0, q.shape[0], tile):
                    tile_masks = [(qi - start, j) for qi, j in masks if start <= qi < start + tile]
                    vals, idx = self._topk(q[start : start + tile], x, k, tile_masks)
                    rows = np.repeat(np.arange(start, start + vals.shape[0], dtype=np.int32), k)
                    parts.append((name, space, rows, vals.reshape(-1), idx.reshape(-1)))
        return candidates_table(batch, parts)

    def _topk(self, q, x: np.ndarray, k: int, masks=()) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if self.device.type == "cuda":
            scores = q @ torch.from_numpy(x).to(self.device).T
            for qi, j in masks:
                scores[qi, j] = -float("inf")
            vals, idx = torch.topk(scores, k, dim=1)
            return vals.cpu().numpy(), idx.cpu().numpy()
        from threadpoolctl import threadpool_limits

        # On CPUs numpy's sgemm (OpenBLAS) is the fast one; Ray starts actors at one BLAS thread.
        with threadpool_limits(limits=self.threads, user_api="blas"):
            scores = q @ x.T
        for qi, j in masks:
            scores[qi, j] = -np.inf
        torch.set_num_threads(self.threads)
        vals, idx = torch.topk(torch.from_numpy(scores), k, dim=1)
        return vals.numpy(), idx.numpy()


def candidates_table(batch: pa.Table, parts) -> pa.Table:
    """[(query_set, space, query rows, scores, batch row indices)] -> one candidates table."""
    if not parts:
        return pa.table({"query_set": pa.array([], pa.string())})
    take = pa.array(np.concatenate([p[4] for p in parts]))
    cols = {
        "query_set": pa.array(np.concatenate([np.full(len(p[2]), p[0], dtype=object) for p in parts]), pa.string()),
        "space": pa.array(np.concatenate([np.full(len(p[2]), p[1], dtype=object) for p in parts]), pa.string()),
        "query": pa.array(np.concatenate([p[2] for p in parts]), pa.int32()),
        "score": pa.array(np.concatenate([p[3] for p in parts]).astype(np.float32)),
        "train_id": _to_text(batch.column("train_id")).take(take),
    }
    for name in (*META_COLUMNS, "path"):
        if name in batch.column_names:
            col = batch.column(name).combine_chunks().take(take)
            cols[name] = col if name == "entities" else _to_text(col)
    return pa.table(cols)


class RunningTopK:
    """Per-query top-k kept on the driver: (Q, k) scores and ids, plus the kept rows' metadata.

    Candidates are folded with one lexicographic sort (query, -score, train_id): results never
    depend on the order batches arrive in, ties included.
    """

    def __init__(self, num_queries: int, k: int, exclude: list[str] | None = None):
        self.num_queries, self.k = num_queries, k
        self.scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
        self.ids = np.full((num_queries, k), None, dtype=object)
        self.paths = np.full((num_queries, k), None, dtype=object)
        self.meta: dict[str, dict] = {}
        self.exclude = np.asarray(exclude, dtype=object) if exclude is not None else None

    def add(self, query: np.ndarray, score: np.ndarray, ids: np.ndarray, paths: np.ndarray, meta: list[dict]) -> None:
        query, score = np.asarray(query, np.int64), np.asarray(score, np.float32)
        ids, paths = np.asarray(ids, dtype=object), np.asarray(paths, dtype=object)
        if self.exclude is not None or not np.isfinite(score).all():  # masked by the scorer: -inf
            keep = np.isfinite(score)
            if self.exclude is not None:
                keep &= ids != self.exclude[query]
            query, score, ids, paths = query[keep], score[keep], ids[keep], paths[keep]
            meta = [m for m, k in zip(meta, keep) if k]
        held = np.isfinite(self.scores)
        q_all = np.concatenate([np.nonzero(held)[0], query])
        s_all = np.concatenate([self.scores[held], score])
        id_all = np.concatenate([self.ids[held], ids])
        path_all = np.concatenate([self.paths[held], paths])
        uniq, id_rank = np.unique(id_all.astype(str), return_inverse=True)
        order = np.lexsort((id_rank, -s_all, q_all))
        q_all, s_all, id_all, path_all, id_rank = (a[order] for a in (q_all, s_all, id_all, path_all, id_rank))
        same = (q_all[1:] == q_all[:-1]) & (id_rank[1:] == id_rank[:-1])
        if same.any():
            i = int(np.flatnonzero(same)[0])
            where = (path_all[i], path_all[i + 1])
            if where[0] != where[1]:
                raise InputError(
                    str(where[1]), f"duplicate train_id '{id_all[i]}' (also in {where[0]})", field="train_id"
                )
            raise InputError(str(where[0]), f"duplicate train_id '{id_all[i]}'", field="train_id")
        starts = np.searchsorted(q_all, np.arange(self.num_queries))
        rank = np.arange(len(q_all)) - starts[q_all]
        keep = rank < self.k
        self.scores.fill(-np.inf)
        self.ids.fill(None)
        self.paths.fill(None)
        self.scores[q_all[keep], rank[keep]] = s_all[keep]
        self.ids[q_all[keep], rank[keep]] = id_all[keep]
        self.paths[q_all[keep], rank[keep]] = path_all[keep]
        for tid, m in zip(ids, meta):
            self.meta.setdefault(tid, m)
        if len(self.meta) > 4 * self.num_queries * self.k:  # forget rows that fell out of every top-k
            live = set(self.ids[np.isfinite(self.scores)])
            self.meta = {t: m for t, m in self.meta.items() if t in live}

    @property
    def rows(self) -> list[list[dict]]:
        out = []
        for q in range(self.num_queries):
            row = []
            for j in range(self.k):
                if not np.isfinite(self.scores[q, j]):
                    break
                tid = self.ids[q, j]
                row.append({**self.meta.get(tid, {}), "train_id": tid, "score": float(self.scores[q, j])})
            out.append(row)
        return out


DEFAULT_FRAGMENT_ROWS = 65_536


def plan_fragments(training: TrainingTable, target_rows: int) -> list[dict]:
    """Work items of about `target_rows` training rows: consecutive Parquet row groups of one file
    (clip-retrieval: a row range of one .npy/.parquet pair). Scoring actors read their own items, so
    the embeddings never travel through the object store."""
    items = []
    for f, path in enumerate(training.files):
        if training.layout == "clip-retrieval":
            rows = training.row_groups[f][0]
            for start in range(0, rows, target_rows):
                items.append(
                    {
                        "path": path,
                        "npy": training.embedding_files[f],
                        "row_groups": [],
                        "start": start,
                        "stop": min(rows, start + target_rows),
                    }
                )
            continue
        group, size = [], 0
        for g, n in enumerate(training.row_groups[f]):
            if group and size + n > target_rows:
                items.append({"path": path, "npy": "", "row_groups": group, "start": 0, "stop": 0})
                group, size = [], 0
            group.append(g)
            size += n
        if group:
            items.append({"path": path, "npy": "", "row_groups": group, "start": 0, "stop": 0})
    return items


def read_fragment(item: dict, columns: list[str]) -> pa.Table:
    if item["npy"]:
        from raymem.laion import read_pair_rows

        return read_pair_rows(item["path"], item["npy"], item["start"], item["stop"])
    fs, p = uris.filesystem(item["path"])
    pf = pq.ParquetFile(p, filesystem=fs)
    present = [c for c in columns if c in pf.schema_arrow.names]
    # One thread: this runs beside the BLAS threads scoring the previous item.
    table = pf.read_row_groups(item["row_groups"], columns=present, use_threads=False)
    return table.append_column("path", pa.array([item["path"]] * table.num_rows, pa.string()))


class FragmentScorer(TopKScorer):
    """Ray Data callable class: fragments in, their top-k per query out; the next fragment is read
    in a thread while the current one is scored (pyarrow and BLAS both release the GIL)."""

    def __init__(self, queries_ref, k: int, columns: list[str], batch_rows: int | None, threads: int = 1):
        import concurrent.futures

        super().__init__(queries_ref, k, threads)
        self.columns, self.batch_rows = columns, batch_rows
        self.reader = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.to_pylist()
        pending = self.reader.submit(read_fragment, items[0], self.columns) if items else None
        out = []
        for i in range(len(items)):
            table = pending.result()
            pending = self.reader.submit(read_fragment, items[i + 1], self.columns) if i + 1 < len(items) else None
            step = self.batch_rows or max(1, table.num_rows)
            for start in range(0, table.num_rows, step):
                out.append(super().__call__(table.slice(start, step)))
        out = [t for t in out if t.num_rows]
        return pa.concat_tables(out) if out else pa.table({"query_set": pa.array([], pa.string())})


@runtime.reraise_user_errors
def nearest_neighbours(
    training: TrainingTable,
    queries: dict[str, Queries],
    k: int,
    *,
    batch_rows: int | None = None,
    actors: int = 1,
    remote_args: dict | None = None,
    threads: int = 1,
    mode: str = "exact",
    nprobe: int = 16,
) -> dict[str, dict[str, RunningTopK]]:
    """Top-k for every query set and space: {query_set: {space: RunningTopK}}."""
    import ray

    queries_ref = ray.put(queries)
    if mode == "faiss":
        from raymem.faiss_index import faiss_candidates

        candidates = faiss_candidates(training, queries_ref, k, nprobe, actors=actors)
    else:
        columns = ["train_id", *[SPACE_COLUMNS[s] for s in training.dims], *META_COLUMNS]
        items = plan_fragments(training, batch_rows or DEFAULT_FRAGMENT_ROWS)
        per_call = 4  # fragments per actor call: enough to overlap reading with scoring
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), -(-len(items) // per_call))))
        candidates = ds.map_batches(
            FragmentScorer,
            fn_constructor_kwargs={
                "queries_ref": queries_ref,
                "k": k,
                "columns": columns,
                "batch_rows": batch_rows,
                "threads": threads,
            },
            batch_size=per_call,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            **(remote_args or {"num_cpus": 1}),
        )
    result = {
        name: {
            space: RunningTopK(len(qs.ids), k, exclude=qs.ids if qs.exclude_self else None)
            for space in qs.matrices
            if space in training.dims
        }
        for name, qs in queries.items()
    }
    for batch in candidates.iter_batches(batch_format="pyarrow", batch_size=None):
        if batch.num_rows:
            fold(batch, result)
    return result


def fold(batch: pa.Table, result: dict[str, dict[str, RunningTopK]]) -> None:
    query_set = batch.column("query_set").to_numpy(zero_copy_only=False)
    space = batch.column("space").to_numpy(zero_copy_only=False)
    query = batch.column("query").to_numpy()
    score = batch.column("score").to_numpy()
    ids = batch.column("train_id").to_numpy(zero_copy_only=False)
    paths = (
        batch.column("path").to_numpy(zero_copy_only=False)
        if "path" in batch.column_names
        else np.full(len(ids), None, dtype=object)
    )
    meta_cols = [c for c in META_COLUMNS if c in batch.column_names]
    for name in np.unique(query_set):
        for sp in np.unique(space[query_set == name]):
            sel = np.flatnonzero((query_set == name) & (space == sp))
            meta_table = batch.select(meta_cols).take(pa.array(sel)) if meta_cols else None
            meta = meta_table.to_pylist() if meta_table is not None else [{}] * len(sel)
            result[name][sp].add(query[sel], score[sel], ids[sel], paths[sel], meta)


def background_sample(training: TrainingTable, n: int, spaces: list[str]) -> Queries | None:
    """Up to `n` training rows, spread over the files, as queries for the train-train background.

    Their nearest neighbour other than themselves (and other than exact duplicates of themselves, when
    the table has `image_hash`) gives DCR's background similarity distribution.
    """
    spaces = [s for s in spaces if s in training.dims]
    if not spaces or n <= 0:
        return None
    if training.layout == "clip-retrieval":
        from raymem.laion import clip_retrieval_sample

        return clip_retrieval_sample(training, n)
    step = max(1, len(training.files) // n)
    files = training.files[::step][:n]
    per_file = max(1, -(-n // len(files)))
    ids, hashes, mats = [], [], {s: [] for s in spaces}
    for path in files:
        fs, p = uris.filesystem(path)
        pf = pq.ParquetFile(p, filesystem=fs)
        columns = ["train_id", *[SPACE_COLUMNS[s] for s in spaces]]
        if "image_hash" in pf.schema_arrow.names:
            columns.append("image_hash")
        batch = next(pf.iter_batches(batch_size=per_file, columns=columns), None)
        if batch is None:
            continue
        batch = pa.Table.from_batches([batch]).append_column("path", pa.array([path] * batch.num_rows))
        ids += _to_text(batch.column("train_id")).to_pylist()
        hashes += (
            batch.column("image_hash").to_pylist() if "image_hash" in batch.column_names else [None] * batch.num_rows
        )
        for s in spaces:
            mats[s].append(checked_matrix(batch, SPACE_COLUMNS[s], training.dims[s]))
        if len(ids) >= n:
            break
    if not ids:
        return None
    matrices = {s: np.concatenate(m)[:n] for s, m in mats.items()}
    return Queries(ids=ids[:n], matrices=matrices, exclude_self=True, hashes=hashes[:n])


def background_from(result: dict[str, RunningTopK]) -> dict[str, dict]:
    """Percentiles of the train-train nearest-neighbour similarity per space."""
    out = {}
    for space, running in result.items():
        top1 = running.scores[:, 0]
        top1 = top1[np.isfinite(top1)].astype(np.float64)
        if len(top1):
            out[space] = {
                "n": int(len(top1)),
                **{f"p{q}": float(np.percentile(top1, q)) for q in (50, 75, 90, 95, 99)},
            }
    return out


@dataclass
class EntityStats:
    """What the training set says about an entity: how many images carry its tag, and their mean CLIP
    embedding (the reference the labeler measures "is the entity rendered?" against)."""

    count: int
    centroid: np.ndarray | None


@runtime.reraise_user_errors
def entity_stats(training: TrainingTable, entities: set[str]) -> dict[str, EntityStats]:
    """Per entity: tagged rows and the normalised mean of their CLIP embeddings (one streamed pass over
    the `entities` and `clip_embedding` columns). Empty when the table has no entity tags."""
    import ray

    if "entities" not in training.columns or not entities or training.layout != "parquet":
        return {}
    wanted = sorted(entities)
    dim = training.dims.get("clip")

    def accumulate(batch: pa.Table) -> pa.Table:
        tags = batch.column("entities").to_pylist()
        emb = embedding_matrix(batch.column("clip_embedding")) if dim else None
        counts = dict.fromkeys(wanted, 0)
        sums = {e: np.zeros(dim or 1, np.float64) for e in wanted}
        for i, row in enumerate(tags):
            for e in row or ():
                if e in counts:
                    counts[e] += 1
                    if emb is not None:
                        sums[e] += emb[i]
        return pa.table({"entity": wanted, "n": [counts[e] for e in wanted], "sum": [sums[e].tolist() for e in wanted]})

    columns = ["entities", *(["clip_embedding"] if dim else [])]
    ds = ray.data.read_parquet(training.files).select_columns(columns)
    counts = dict.fromkeys(wanted, 0)
    sums = {e: np.zeros(dim or 1, np.float64) for e in wanted}
    for batch in ds.map_batches(accumulate, batch_format="pyarrow", batch_size=65_536).iter_batches(
        batch_format="pyarrow", batch_size=None
    ):
        for e, n, total in zip(*(batch.column(c).to_pylist() for c in ("entity", "n", "sum"))):
            counts[e] += n
            sums[e] += np.asarray(total)
    out = {}
    for e in wanted:
        centroid = None
        if dim and counts[e]:
            centroid = (sums[e] / max(np.linalg.norm(sums[e]), 1e-12)).astype(np.float32)
        out[e] = EntityStats(counts[e], centroid)
    return out
