"""Training sources: where training-set embeddings come from, behind one interface.

A `TrainingSource` knows one on-disk layout and answers four questions, so that validation, the top-k
join, the background sample, entity statistics and mining never branch on the layout:

    inspect(uri, spaces)        footers/headers only: files, rows, embedding dimensions, columns
    fragments(table, rows)      work items of about `rows` rows that a worker reads by itself
    read(item, columns)         one work item as an Arrow table in raymem's training schema (+ `path`)
    sample(table, n, spaces)    up to n rows spread over the files, one table per file (the background)
    dataset(table, columns)     a Ray dataset of some columns, for streamed whole-table passes

Layouts: raymem's Parquet (`ParquetSource`, here) and clip-retrieval / LAION's `img_emb/*.npy` +
`metadata/*.parquet` (`raymem.laion.ClipRetrievalSource`). A new layout is one more class registered in
`source_for`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.errors import InputError
from raymem.schema import META_COLUMNS, SPACE_COLUMNS, TRAIN_REQUIRED, embedding_matrix

log = logging.getLogger(__name__)

CLIP_RETRIEVAL = "clip-retrieval:"
INDEX_MANIFEST = "_index.json"


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

    @property
    def source(self) -> TrainingSource:
        return source_for(self.layout)

    def for_spaces(self, spaces: dict[str, int]) -> TrainingTable:
        """The table restricted to the scan's embedding spaces, whose dimensions must match."""
        dims = {}
        for space, dim in spaces.items():
            column = SPACE_COLUMNS[space]
            if column not in self.columns:
                continue
            have = self.dims.get(space)
            if have is not None and have != dim:
                raise InputError(
                    self.files[0],
                    f"embedding dimension {have} does not match the scan's {space} model ({dim})",
                    field=column,
                )
            dims[space] = dim
        return replace(self, dims=dims)


class TrainingSource(Protocol):
    layout: str

    def inspect(self, uri: str, spaces: dict[str, int], *, skip_bad_files: bool = False) -> TrainingTable: ...

    def fragments(self, training: TrainingTable, target_rows: int) -> list[dict]: ...

    def read(self, item: dict, columns: list[str]) -> pa.Table: ...

    def sample(self, training: TrainingTable, n: int, spaces: list[str]) -> list[pa.Table]: ...

    def dataset(self, training: TrainingTable, columns: list[str]): ...


def source_for(layout_or_uri: str) -> TrainingSource:
    """The source of a layout name, or of a `training.embeddings` value (by its prefix)."""
    from raymem.laion import ClipRetrievalSource

    if layout_or_uri == ClipRetrievalSource.layout or layout_or_uri.startswith(CLIP_RETRIEVAL):
        return ClipRetrievalSource()
    return ParquetSource()


def inspect_training(uri: str, spaces: dict[str, int], *, skip_bad_files: bool = False) -> TrainingTable:
    """Validate the training table (footers and headers only) against the scan's embedding spaces."""
    source = source_for(uri)
    return source.inspect(uri.removeprefix(CLIP_RETRIEVAL), spaces, skip_bad_files=skip_bad_files)


# -- checks shared by every layout -------------------------------------------------------------------------
def to_text(col) -> pa.Array:
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
        tid = to_text(batch.column("train_id"))[i].as_py()
        raise InputError(source, f"the embedding of train_id '{tid}' {what} ({len(bad)} bad row(s))", field=column)
    if np.abs(sq - 1.0).max() > 1e-3:  # not normalised: make the scores cosines
        x = x / np.sqrt(sq)[:, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def take_sample(heads, n: int, columns: list[str]) -> list[pa.Table]:
    """The first rows of each file (`heads`, tables with `path`) until `n` rows are taken, in the sample's
    columns plus `image_hash` (null where the layout has none) and `path`."""
    parts, rows = [], 0
    for table in heads:
        if "image_hash" not in table.column_names:
            table = table.append_column("image_hash", pa.nulls(table.num_rows, pa.string()))
        parts.append(table.select([*columns, "image_hash", "path"]))
        rows += table.num_rows
        if rows >= n:
            break
    return parts


def parquet_dataset(files: list[str], columns: list[str]):
    """A Ray dataset of some columns of Parquet files, for streamed whole-table passes."""
    import ray

    return ray.data.read_parquet(files).select_columns(columns)


def read_index_manifest(uri: str) -> dict | None:
    """The `_index.json` that `raymem index` writes beside its shards (precomputed background, FAISS)."""
    if uris.is_remote(uri) or uris.is_dir(uri):
        path = uris.join(uri, INDEX_MANIFEST)
        if uris.exists(path):
            return json.loads(uris.read_bytes(path))
    return None


# -- raymem's Parquet layout -------------------------------------------------------------------------------
def _embedding_dim(source: str, schema: pa.Schema, column: str) -> int | None:
    t = schema.field(column).type
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return None  # checked per batch
    raise InputError(source, f"expected a list of float32, got {t}", field=column)


class ParquetSource:
    """raymem's training schema in Parquet files under a directory or prefix (local or s3://)."""

    layout = "parquet"

    def inspect(self, uri: str, spaces: dict[str, int], *, skip_bad_files: bool = False) -> TrainingTable:
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
                    continue  # clip_embedding is required (above); sscd_embedding is optional
                dim = _embedding_dim(path, schema, col)
                expected = spaces.get(space)
                if dim is not None and expected is not None and dim != expected:
                    raise InputError(
                        path,
                        f"embedding dimension {dim} does not match the scan's {space} model ({expected})",
                        field=col,
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
            index=read_index_manifest(uri),
            row_groups=row_groups,
        )

    def fragments(self, training: TrainingTable, target_rows: int) -> list[dict]:
        """Consecutive row groups of one file, about `target_rows` rows each."""
        items = []
        for f, path in enumerate(training.files):
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

    def read(self, item: dict, columns: list[str]) -> pa.Table:
        fs, p = uris.filesystem(item["path"])
        pf = pq.ParquetFile(p, filesystem=fs)
        present = [c for c in columns if c in pf.schema_arrow.names]
        # One thread: this runs beside the BLAS threads scoring the previous item.
        table = pf.read_row_groups(item["row_groups"], columns=present, use_threads=False)
        return table.append_column("path", pa.array([item["path"]] * table.num_rows, pa.string()))

    def sample(self, training: TrainingTable, n: int, spaces: list[str]) -> list[pa.Table]:
        step = max(1, len(training.files) // n)
        files = training.files[::step][:n]
        per_file = max(1, -(-n // len(files)))
        columns = ["train_id", *[SPACE_COLUMNS[s] for s in spaces]]

        def heads():
            for path in files:
                fs, p = uris.filesystem(path)
                pf = pq.ParquetFile(p, filesystem=fs)
                wanted = columns + (["image_hash"] if "image_hash" in pf.schema_arrow.names else [])
                batch = next(pf.iter_batches(batch_size=per_file, columns=wanted), None)
                if batch is not None:
                    yield pa.Table.from_batches([batch]).append_column("path", pa.array([path] * batch.num_rows))

        return take_sample(heads(), n, columns)

    def dataset(self, training: TrainingTable, columns: list[str]):
        return parquet_dataset(training.files, columns)
