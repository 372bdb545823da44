"""`raymem import-embeddings`: convert a clip-retrieval / LAION layout (read in place by
`raymem.sources.clip_retrieval`) into raymem's training Parquet, tagging entities in the captions."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.schema import embedding_matrix, stored_embedding_array
from raymem.sources.clip_retrieval import inspect_clip_retrieval, read_pair


def convert(root: str, output: str, entities: list[str] | None = None, storage: str = "list") -> dict:
    """Convert a clip-retrieval layout into raymem's Parquet schema, one output file per pair, on Ray;
    embeddings stored as `storage` (raymem.schema.EMBEDDING_STORAGES)."""
    import ray

    from raymem.captions import tag_entities
    from raymem.outputs import parquet_options

    training = inspect_clip_retrieval(root, {})

    def convert_pair(row: dict) -> dict:
        meta_path, npy_path = row["meta"], row["npy"]
        stem = re.search(r"(\d+)\.parquet$", meta_path).group(1)
        target = uris.join(output, f"part-{int(stem):05d}.parquet")
        rows = 0
        with uris.staged_local_file(target, ".parquet") as tmp:
            writer = None
            for table in read_pair(meta_path, npy_path):  # chunk by chunk: memory stays flat
                table = table.drop_columns(["path"])
                if storage != "list":
                    at = table.column_names.index("clip_embedding")
                    packed = stored_embedding_array(embedding_matrix(table.column(at)), training.dims["clip"], storage)
                    table = table.set_column(at, "clip_embedding", packed)
                if entities:
                    captions = table.column("caption").to_pylist() if "caption" in table.column_names else []
                    tags = [tag_entities(c, entities) for c in captions]
                    table = table.append_column("entities", pa.array(tags, pa.list_(pa.string())))
                writer = writer or pq.ParquetWriter(tmp, table.schema, **parquet_options(table.schema))
                writer.write_table(table)
                rows += table.num_rows
            if writer is not None:
                writer.close()
        return {"file": target, "rows": rows}

    items = [{"meta": m, "npy": e} for m, e in zip(training.files, training.embedding_files)]
    done = ray.data.from_items(items, override_num_blocks=len(items)).map(convert_pair).take_all()
    return {"files": len(done), "rows": sum(d["rows"] for d in done), "dim": training.dims["clip"]}
