"""Whole-table checks of `train_id`, streamed with bounded memory: no null id, no id twice.

A duplicate id makes two training images indistinguishable in every table downstream (a copy "of
training image 'x'" could be either), and a null id names no image at all, so both are bad input
however far apart the rows sit. Workers read only the `train_id` column of each fragment (on their own,
or as part of the exact join's read: `raymem.passes`) and return a 64-bit hash, fragment and row per
training row; the driver spills them into hash partitions on local
disk (16 bytes a row), then sorts one partition at a time (memory: rows / partitions x 16 bytes) and
confirms each equal hash by reading the ids themselves, so a hash collision is never reported.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from raymem.errors import InputError
from raymem.passes import TablePass, run_passes
from raymem.sources import TrainingTable, to_text

log = logging.getLogger(__name__)

ROW = np.dtype([("hash", "<u8"), ("fragment", "<u4"), ("row", "<u4")])
PARTITION_ROWS = 32_000_000  # rows per partition sorted in memory (~0.5 GB)
FRAGMENT_ROWS = 1_000_000


def hash_ids(ids: pa.Array) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(to_text(ids).to_numpy(zero_copy_only=False), categorize=False)


class TrainIdCheck(TablePass):
    """No null `train_id` (raised by the worker that reads it) and no id twice (found on the driver once
    every row was seen): a (hash, item, row) per training row, spilled into hash partitions on local
    disk as the partials arrive."""

    name = "train_id_check"
    columns = ("train_id",)
    partial_schema = pa.schema([("hash", pa.uint64()), ("fragment", pa.uint32()), ("row", pa.uint32())])

    def __init__(self, num_rows: int, partition_rows: int = PARTITION_ROWS):
        self.partitions = max(1, -(-num_rows // partition_rows))

    def start(self, items: list[dict], source) -> None:
        self._items, self._source = items, source
        self._tmp = tempfile.TemporaryDirectory(prefix="raymem-ids-")
        self._files = [Path(self._tmp.name) / f"{p:05d}.bin" for p in range(self.partitions)]
        self._handles = [open(f, "wb") for f in self._files]  # noqa: SIM115 - closed in finish

    def partial(self, table: pa.Table, item: dict) -> pa.Table:
        ids = table.column("train_id")
        if ids.null_count:
            first_null = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
            row = item["start"] + first_null + 1
            raise InputError(item["path"], f"train_id is null ({ids.null_count} null(s))", row=row, field="train_id")
        n = len(ids)
        return pa.table(
            {
                "hash": pa.array(hash_ids(ids), pa.uint64()),
                "fragment": pa.array(np.full(n, item["index"], np.uint32)),
                "row": pa.array(np.arange(n, dtype=np.uint32)),
            },
            schema=self.partial_schema,
        )

    def fold(self, partial: pa.Table) -> None:
        if not partial.num_rows:
            return
        rows = np.empty(partial.num_rows, ROW)
        for name in ROW.names:
            rows[name] = partial.column(name).to_numpy()
        which = rows["hash"] % np.uint64(self.partitions)
        for p in np.unique(which):
            rows[which == p].tofile(self._handles[int(p)])

    def finish(self) -> None:
        """Raise a one-line InputError (file, row, field) for the first duplicate; the spill is removed
        either way."""
        try:
            for h in self._handles:
                h.close()
            for f in self._files:
                _check_partition(np.fromfile(f, ROW), self._items, self._source)
        finally:
            self.close()

    def close(self) -> None:
        """Remove the spill (also when the pass it rode along failed)."""
        for h in getattr(self, "_handles", ()):
            h.close()
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None


def check_train_ids(training: TrainingTable, *, partition_rows: int = PARTITION_ROWS) -> None:
    """Raise a one-line InputError (file, row, field) for a null or duplicate `train_id` anywhere, on a
    read of the ids alone (the exact join runs the same check on its own read: `TrainIdCheck`)."""
    check = TrainIdCheck(training.num_rows, partition_rows)
    run_passes(training, [check], fragment_rows=FRAGMENT_ROWS, name="check_train_ids")


def _check_partition(rows: np.ndarray, items: list[dict], source) -> None:
    if len(rows) < 2:
        return
    rows = rows[np.argsort(rows["hash"], kind="stable")]
    same = np.flatnonzero(rows["hash"][1:] == rows["hash"][:-1])
    for i in same:  # equal hashes: compare the ids themselves (a collision is not a duplicate)
        a, b = rows[i], rows[i + 1]
        id_a, id_b = _id_at(items, source, a), _id_at(items, source, b)
        if id_a == id_b:
            first, second = sorted((a, b), key=lambda r: (int(r["fragment"]), int(r["row"])))
            where = items[int(first["fragment"])]
            here = items[int(second["fragment"])]
            also = f"{where['path']} row {where['start'] + int(first['row']) + 1}"
            raise InputError(
                here["path"],
                f"duplicate train_id '{id_b}' (also at {also})",
                row=here["start"] + int(second["row"]) + 1,
                field="train_id",
            )


def _id_at(items: list[dict], source, row) -> str:
    item = items[int(row["fragment"])]
    return to_text(source.read(item, ["train_id"]).column("train_id"))[int(row["row"])].as_py()
