"""raymem's own layout: training-schema Parquet files under a directory or prefix (local or s3://)."""

from __future__ import annotations

import hashlib
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.errors import InputError
from raymem.schema import META_COLUMNS, SPACE_COLUMNS, TRAIN_REQUIRED, embedding_dim, is_embedding_type
from raymem.sources.base import TrainingTable, parquet_dataset, path_column, read_index_manifest, take_sample

log = logging.getLogger(__name__)


def _embedding_dim(source: str, schema: pa.Schema, column: str) -> int | None:
    t = schema.field(column).type
    if is_embedding_type(t):
        return embedding_dim(t)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return None  # checked per batch
    if pa.types.is_fixed_size_binary(t):
        raise InputError(
            source, f"{t} without raymem's packed-embedding type: its dtype and dimension are unknown", field=column
        )
    raise InputError(source, f"expected a list of float32 or packed embeddings, got {t}", field=column)


def footer_digest(meta: pq.FileMetaData) -> str:
    """A Parquet file's footer as a digest: row groups, and per column chunk its sizes, offsets, encodings
    and statistics -- rewritten contents change it (other tags, re-computed embeddings), the file's path
    and modification time do not."""
    return hashlib.sha256(json.dumps(meta.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        good, skipped, row_groups, footers = [], [], [], []
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
            footers.append(footer_digest(meta))
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
            footers=footers,
        )

    def fragments(self, training: TrainingTable, target_rows: int) -> list[dict]:
        """Consecutive row groups of one file, about `target_rows` rows each."""
        items = []
        for f, path in enumerate(training.files):
            groups: list[list[int]] = [[]]
            sizes = [0]
            for g, n in enumerate(training.row_groups[f]):
                if groups[-1] and sizes[-1] + n > target_rows:
                    groups.append([])
                    sizes.append(0)
                groups[-1].append(g)
                sizes[-1] += n
            first = 0  # `start`/`stop`: the item's rows within its file
            for group, size in zip(groups, sizes):
                if group:
                    items.append({"path": path, "npy": "", "row_groups": group, "start": first, "stop": first + size})
                first += size
        return items

    def read(self, item: dict, columns: list[str]) -> pa.Table:
        fs, p = uris.filesystem(item["path"])
        if uris.is_remote(item["path"]):
            pf = pq.ParquetFile(p, filesystem=fs)
        else:  # memory-mapped, as local .npy files are: PLAIN pages are not copied into a read buffer first
            pf = pq.ParquetFile(p, memory_map=True)
        present = [c for c in columns if c in pf.schema_arrow.names]
        # One thread: this runs beside the BLAS threads scoring the previous item.
        try:
            table = pf.read_row_groups(item["row_groups"], columns=present, use_threads=False)
        except (OSError, pa.ArrowException) as err:  # corrupt pages behind an intact footer
            text = "".join(c for c in str(err) if c.isprintable() or c == "\n").strip()
            first = text.splitlines()[0] if text else type(err).__name__
            raise InputError(
                item["path"], f"unreadable Parquet data in row groups {item['row_groups']}: {first}"
            ) from None
        return table.append_column("path", path_column(item["path"], table.num_rows))

    def sample(self, training: TrainingTable, n: int, spaces: list[str]) -> list[pa.Table]:
        step = max(1, len(training.files) // n)
        files = training.files[::step][:n]
        per_file = max(1, -(-n // len(files)))
        columns = ["train_id", *[SPACE_COLUMNS[s] for s in spaces]]

        def heads():
            for path in files:
                fs, p = uris.filesystem(path)
                pf = pq.ParquetFile(p, filesystem=fs)
                wanted = columns + [c for c in ("image_hash", "image_uri") if c in pf.schema_arrow.names]
                batch = next(pf.iter_batches(batch_size=per_file, columns=wanted), None)
                if batch is not None:
                    yield pa.Table.from_batches([batch]).append_column("path", path_column(path, batch.num_rows))

        return take_sample(heads(), n, columns)

    def dataset(self, training: TrainingTable, columns: list[str]):
        return parquet_dataset(training.files, columns)
