"""Whole-table passes that ride along a read of the training table.

A scan needs more from the training table than the join's neighbours: the `train_id` checks
(`raymem.train_ids`) and the entity counts and centroids (`raymem.entity_stats`). Each is a `TablePass`:
its per-item part runs on the worker that read the item, its driver part folds what the workers return.
The exact join runs them on the rows it reads anyway (one read of the table instead of three: the
separate passes took longer than the join itself on a 1 M-row table; docs/join.md); `run_passes` runs
them on their own read when the join does not read the table (FAISS mode) or there is no join.

What travels from a worker is one row per call: a `list<struct>` column per pass holding its partial
rows (the join adds its candidates the same way), so every call's output has one schema whatever an item
held, and a pass's partial cannot be lost to a call that found no candidates.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from raymem import runtime
from raymem.sources import TrainingTable, source_for


class TablePass:
    """One computation over every training row: `partial` per item on a worker, `fold` per partial on
    the driver, `finish` once after the last. A pass is pickled to the workers before the driver folds
    anything: driver state is created in `start` and kept out of the pickle (attributes named `_...`)."""

    name: str = ""
    columns: tuple[str, ...] = ()  # the training columns `partial` reads
    partial_schema: pa.Schema

    def start(self, items: list[dict], source) -> None:
        """Driver, before streaming: the items the workers will read (each with its `index`)."""

    def partial(self, table: pa.Table, item: dict) -> pa.Table:
        """Worker: this pass's rows for one item (`table` holds the item's rows, at least `columns`)."""
        raise NotImplementedError

    def fold(self, partial: pa.Table) -> None:
        """Driver: one item's partial rows."""
        raise NotImplementedError

    def finish(self) -> None:
        """Driver, after the last fold."""

    def close(self) -> None:
        """Driver: release what `start` took (called whether or not the read completed)."""

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def indexed(items: list[dict]) -> list[dict]:
    """Work items numbered in order: a pass's partials name their item by this index."""
    return [{**item, "index": i} for i, item in enumerate(items)]


def packed_row(parts: dict[str, pa.Table], types: dict[str, pa.DataType], **scalars) -> pa.Table:
    """One output row of a worker call: each named table as a list<struct> value of the given struct
    type, plus scalar columns."""
    cols = {name: pa.array([value], type=pa.int64()) for name, value in scalars.items()}
    for name, struct_type in types.items():
        table = parts[name]
        values = pa.StructArray.from_arrays(
            [table.column(f.name).combine_chunks().cast(f.type) for f in struct_type],
            fields=list(struct_type),
        )
        cols[name] = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
    return pa.table(cols)


def unpacked(batch: pa.Table, name: str) -> pa.Table:
    """All rows of the list<struct> column `name` of a batch of worker output rows, as one table."""
    flat = batch.column(name).combine_chunks().flatten()
    return pa.Table.from_struct_array(flat)


def struct_of(schema: pa.Schema) -> pa.StructType:
    return pa.struct(list(schema))


def fold_all(batch: pa.Table, passes: Iterable[TablePass]) -> None:
    for p in passes:
        p.fold(unpacked(batch, p.name))


class PassReader:
    """Ray Data callable class: items in, one row per call with every pass's partials out."""

    def __init__(self, layout: str, passes: list[TablePass]):
        self.source = source_for(layout)
        self.passes = passes
        self.columns = sorted({c for p in passes for c in p.columns})

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = {p.name: [] for p in self.passes}
        for item in batch.to_pylist():
            table = self.source.read(item, self.columns)
            for p in self.passes:
                tables[p.name].append(p.partial(table, item))
        parts = {p.name: pa.concat_tables(tables[p.name]) for p in self.passes}
        return packed_row(parts, {p.name: struct_of(p.partial_schema) for p in self.passes})


@runtime.reraise_user_errors
def run_passes(training: TrainingTable, passes: list[TablePass], *, fragment_rows: int, name: str) -> None:
    """The passes on a read of their own: CPU tasks in reused workers (all CPUs but one at a time), items
    of ~`fragment_rows`. Each pass is finished, and closed whatever happens."""
    if not passes:
        return
    source = source_for(training.layout)
    items = indexed(source.fragments(training, fragment_rows))
    cluster = runtime.ClusterResources.current()
    actors = max(1, min(len(items), int(max(cluster.cpus - 1, 1))))
    plan = runtime.StagePlan.fixed(actors, num_gpus=0.0, num_cpus=1.0)
    try:
        for p in passes:
            p.start(items, source)
        kwargs = {"layout": training.layout, "passes": passes}
        stage = runtime.map_stage(
            name, items, PassReader, plan, constructor_kwargs=kwargs, batch_size=4, reuse_workers=True
        )
        for batch in stage:
            fold_all(batch, passes)
        for p in passes:
            p.finish()
    finally:
        for p in passes:
            p.close()
