"""The clip-retrieval / LAION embedding layout, read in place or converted to raymem's Parquet.

    <root>/img_emb/img_emb_<N>.npy          (rows, d) float16 or float32, L2-normalised
    <root>/metadata/metadata_<N>.parquet    the same rows, in the same order (caption, url, key, ...)

This is what `clip-retrieval inference` writes and what LAION released for LAION-400M/5B, so users
with those embeddings need not re-embed. Pairs are matched by N; a missing partner, a row-count or a
dimension mismatch is a one-line error naming the file. Reading streams each pair in chunks (memory
mapped when local, ranged reads on s3://), never a whole file.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.errors import InputError
from raymem.schema import embedding_array
from raymem.sources.base import TrainingTable, parquet_dataset, path_column, take_sample

log = logging.getLogger(__name__)

CHUNK_ROWS = 65_536
# Metadata columns that become raymem's, in order of preference.
ID_COLUMNS = ("key", "train_id", "id")
URI_COLUMNS = ("url", "image_path", "image_uri")


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # where the array data starts
    fortran: bool


def read_npy_header(path: str) -> NpyHeader:
    fs, p = uris.filesystem(path)
    with fs.open_input_file(p) as f:
        head = f.read(min(f.size(), 65_536))
    buf = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf)
    except ValueError as err:
        raise InputError(path, f"not a .npy file: {err}") from None
    return NpyHeader(tuple(shape), np.dtype(dtype), buf.tell(), bool(fortran))


def _numbered(files: list[str], stem: str, suffix: str) -> dict[int, str]:
    out = {}
    for path in files:
        m = re.fullmatch(rf"{stem}_(\d+){re.escape(suffix)}", path.rsplit("/", 1)[-1])
        if m:
            out[int(m.group(1))] = path
    return out


def inspect_clip_retrieval(root: str, spaces: dict[str, int]) -> TrainingTable:
    emb = _numbered(uris.list_files(uris.join(root, "img_emb"), ".npy"), "img_emb", ".npy")
    meta = _numbered(uris.list_files(uris.join(root, "metadata"), ".parquet"), "metadata", ".parquet")
    if not emb:
        raise InputError(uris.join(root, "img_emb"), "no img_emb_<N>.npy files found")
    for n in sorted(set(emb) ^ set(meta)):
        have, want = (emb[n], f"metadata/metadata_{n}.parquet") if n in emb else (meta[n], f"img_emb/img_emb_{n}.npy")
        raise InputError(have, f"no matching {want}")
    dim = None
    columns: list[str] | None = None
    total = 0
    rows_of = {}
    for n in sorted(emb):
        header = read_npy_header(emb[n])
        if len(header.shape) != 2 or header.fortran:
            raise InputError(emb[n], f"expected a C-ordered (rows, dim) array, got shape {header.shape}")
        rows, d = header.shape
        fs, p = uris.filesystem(meta[n])
        try:
            md = pq.read_metadata(p, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise InputError(meta[n], f"not a readable Parquet file: {err}") from None
        if md.num_rows != rows:
            raise InputError(
                emb[n], f"{rows} embeddings but {meta[n]} has {md.num_rows} rows (they must be row-aligned)"
            )
        if dim is not None and d != dim:
            raise InputError(emb[n], f"embedding dimension {d} differs from the other files' ({dim})")
        dim = d
        rows_of[n] = rows
        names = md.schema.to_arrow_schema().names
        columns = names if columns is None else [c for c in columns if c in names]
        total += rows
    if "clip" in spaces and dim != spaces["clip"]:
        raise InputError(
            emb[min(emb)], f"embedding dimension {dim} does not match the scan's clip model ({spaces['clip']})"
        )
    mapped = []
    if "caption" in (columns or []):
        mapped.append("caption")
    if any(c in (columns or []) for c in URI_COLUMNS):
        mapped.append("image_uri")
    if total == 0:
        raise InputError(root, "the training table has no rows")
    return TrainingTable(
        uri=f"clip-retrieval:{root}",
        files=[meta[n] for n in sorted(emb)],
        dims={"clip": dim},
        columns=mapped,
        num_rows=total,
        layout="clip-retrieval",
        embedding_files=[emb[n] for n in sorted(emb)],
        row_groups=[[rows_of[n]] for n in sorted(emb)],
    )


def _read_rows(npy: str, header: NpyHeader, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a .npy file as float32, without reading the rest."""
    dim = header.shape[1]
    itemsize = header.dtype.itemsize
    if not uris.is_remote(npy):
        arr = np.load(npy, mmap_mode="r")
        return np.asarray(arr[start:stop], dtype=np.float32)
    fs, p = uris.filesystem(npy)
    with fs.open_input_file(p) as f:
        f.seek(header.offset + start * dim * itemsize)
        data = f.read((stop - start) * dim * itemsize)
    return np.frombuffer(data, dtype=header.dtype).reshape(stop - start, dim).astype(np.float32)


def _open_metadata(meta_path: str):
    """(ParquetFile, id column, URI column, columns to read) of a metadata file."""
    fs, p = uris.filesystem(meta_path)
    pf = pq.ParquetFile(p, filesystem=fs)
    names = pf.schema_arrow.names
    id_col = next((c for c in ID_COLUMNS if c in names), None)
    uri_col = next((c for c in URI_COLUMNS if c in names), None)
    return pf, id_col, uri_col, [c for c in (id_col, uri_col, "caption") if c and c in names]


def read_pair(meta_path: str, npy_path: str, chunk_rows: int = CHUNK_ROWS):
    """Yield raymem-schema tables (train_id, clip_embedding, caption, image_uri, path) of one pair, in chunks."""
    header = read_npy_header(npy_path)
    pf, id_col, uri_col, wanted = _open_metadata(meta_path)
    start = 0
    for batch in pf.iter_batches(batch_size=chunk_rows, columns=wanted or None):
        meta = pa.Table.from_batches([batch])
        yield _pair_table(meta_path, npy_path, header, meta, id_col, uri_col, start, batch.num_rows)
        start += batch.num_rows


def _metadata_rows(pf: pq.ParquetFile, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a metadata file, reading only the row groups that hold them (a LAION
    metadata shard has a million rows; a join item wants 65,536 of them)."""
    first, groups, offset = None, [], 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + rows > start:
            first = offset if first is None else first
            groups.append(g)
        offset += rows
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    return pf.read_row_groups(groups, columns=columns, use_threads=False).slice(start - first, stop - start)


def read_pair_rows(meta_path: str, npy_path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a pair, in raymem's schema (with the `path` column)."""
    header = read_npy_header(npy_path)
    pf, id_col, uri_col, wanted = _open_metadata(meta_path)
    meta = _metadata_rows(pf, wanted, start, stop) if wanted else None
    return _pair_table(meta_path, npy_path, header, meta, id_col, uri_col, start, stop - start)


def _pair_table(meta_path, npy_path, header, meta, id_col, uri_col, start: int, n: int) -> pa.Table:
    emb = _read_rows(npy_path, header, start, start + n)
    shard = re.search(r"(\d+)\.parquet$", meta_path)
    shard_no = shard.group(1) if shard else "0"
    if id_col:
        ids = meta.column(id_col).cast(pa.string())
    else:
        ids = pa.array([f"{shard_no}:{i}" for i in range(start, start + n)], pa.string())
    cols = {"train_id": ids, "clip_embedding": embedding_array(emb, header.shape[1])}
    if meta is not None and "caption" in meta.column_names:
        cols["caption"] = meta.column("caption").cast(pa.string())
    if uri_col:
        cols["image_uri"] = meta.column(uri_col).cast(pa.string())
    cols["path"] = path_column(npy_path, n)
    return pa.table(cols)


class ClipRetrievalSource:
    """The clip-retrieval / LAION layout read in place (see the module docstring)."""

    layout = "clip-retrieval"

    def inspect(self, uri: str, spaces: dict[str, int], *, skip_bad_files: bool = False) -> TrainingTable:
        return inspect_clip_retrieval(uri, spaces)

    def fragments(self, training: TrainingTable, target_rows: int) -> list[dict]:
        """Row ranges of one .npy/.parquet pair."""
        items = []
        for f, path in enumerate(training.files):
            rows = training.row_groups[f][0]
            for start in range(0, rows, target_rows):
                stop = min(rows, start + target_rows)
                items.append(
                    {"path": path, "npy": training.embedding_files[f], "row_groups": [], "start": start, "stop": stop}
                )
        return items

    def read(self, item: dict, columns: list[str]) -> pa.Table:
        return read_pair_rows(item["path"], item["npy"], item["start"], item["stop"])

    def sample(self, training: TrainingTable, n: int, spaces: list[str]) -> list[pa.Table]:
        per_pair = max(1, -(-n // len(training.files)))
        pairs = zip(training.files, training.embedding_files)
        heads = (next(read_pair(meta, npy, chunk_rows=per_pair), None) for meta, npy in pairs)
        return take_sample((h for h in heads if h is not None), n, ["train_id", "clip_embedding"])

    def dataset(self, training: TrainingTable, columns: list[str]):
        return parquet_dataset(training.files, columns)
