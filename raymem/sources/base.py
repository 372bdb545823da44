"""The training-source contract: what every layout's inspection yields (`TrainingTable`), the
`TrainingSource` protocol, and the checks every layout shares."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import pyarrow as pa

from raymem import uri as uris
from raymem.errors import InputError
from raymem.schema import SPACE_COLUMNS, embedding_matrix

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
    # per file, a digest of its Parquet footer (column chunk sizes, offsets, statistics): what the scan's
    # identity knows of the file's contents without reading its data (raymem.identity)
    footers: list[str] = field(default_factory=list)

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


# -- checks shared by every layout -------------------------------------------------------------------------
def to_text(col) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col if pa.types.is_string(col.type) else col.cast(pa.string())


def path_column(path: str, n: int) -> pa.Array:
    """The file every row of a batch came from (`path`): one value repeated, built without n Python
    strings (that took as long as decoding the batch's embeddings)."""
    return pa.repeat(pa.scalar(path, pa.string()), n)


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
    columns plus `image_hash` and `image_uri` (null where the table has none) and `path`."""
    parts, rows = [], 0
    for table in heads:
        for name in ("image_hash", "image_uri"):
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        parts.append(table.select([*columns, "image_hash", "image_uri", "path"]))
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
