"""Training sources: where training-set embeddings come from, behind one interface.

A `TrainingSource` knows one on-disk layout and answers four questions, so that validation, the top-k
join, the background sample, entity statistics and mining never branch on the layout:

    inspect(uri, spaces)        footers/headers only: files, rows, embedding dimensions, columns
    fragments(table, rows)      work items of about `rows` rows that a worker reads by itself
    read(item, columns)         one work item as an Arrow table in raymem's training schema (+ `path`)
    sample(table, n, spaces)    up to n rows spread over the files, one table per file (the background)
    dataset(table, columns)     a Ray dataset of some columns, for streamed whole-table passes

Layouts: raymem's Parquet (`ParquetSource`, here) and clip-retrieval / LAION's `img_emb/*.npy` +
`metadata/*.parquet` (`raymem.sources.clip_retrieval`). A new layout is one more module here, with a
class registered in `source_for`.
"""

from __future__ import annotations

from raymem.sources.base import (
    CLIP_RETRIEVAL,
    TrainingSource,
    TrainingTable,
    checked_matrix,
    parquet_dataset,
    path_column,
    take_sample,
    to_text,
)
from raymem.sources.clip_retrieval import ClipRetrievalSource
from raymem.sources.parquet import ParquetSource

__all__ = [
    "TrainingSource",
    "TrainingTable",
    "ClipRetrievalSource",
    "ParquetSource",
    "checked_matrix",
    "inspect_training",
    "parquet_dataset",
    "path_column",
    "source_for",
    "take_sample",
    "to_text",
]


def source_for(layout_or_uri: str) -> TrainingSource:
    """The source of a layout name, or of a `training.embeddings` value (by its prefix)."""
    if layout_or_uri == ClipRetrievalSource.layout or layout_or_uri.startswith(CLIP_RETRIEVAL):
        return ClipRetrievalSource()
    return ParquetSource()


def inspect_training(uri: str, spaces: dict[str, int], *, skip_bad_files: bool = False) -> TrainingTable:
    """Validate the training table (footers and headers only) against the scan's embedding spaces."""
    source = source_for(uri)
    return source.inspect(uri.removeprefix(CLIP_RETRIEVAL), spaces, skip_bad_files=skip_bad_files)
