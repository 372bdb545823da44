"""Whole-table checks of `train_id`, streamed with bounded memory: no null id, no id twice.

A duplicate id makes two training images indistinguishable in every table downstream (a copy "of
training image 'x'" could be either), and a null id names no image at all, so both are bad input
however far apart the rows sit. Workers read only the `train_id` column of each fragment and return a
64-bit hash, fragment and row per training row; the driver spills them into hash partitions on local
disk (16 bytes a row), then sorts one partition at a time (memory: rows / partitions x 16 bytes) and
confirms each equal hash by reading the ids themselves, so a hash collision is never reported.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from raymem import runtime
from raymem.errors import InputError
from raymem.sources import TrainingTable, source_for, to_text

log = logging.getLogger(__name__)

ROW = np.dtype([("hash", "<u8"), ("fragment", "<u4"), ("row", "<u4")])
PARTITION_ROWS = 32_000_000  # rows per partition sorted in memory (~0.5 GB)
FRAGMENT_ROWS = 1_000_000


def hash_ids(ids: pa.Array) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(to_text(ids).to_numpy(zero_copy_only=False), categorize=False)


class IdHasher:
    """Ray Data callable class: fragments in, (hash, fragment, row) of every training row out."""

    def __init__(self, layout: str):
        self.source = source_for(layout)

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = []
        for item in batch.to_pylist():
            ids = self.source.read(item, ["train_id"]).column("train_id")
            if ids.null_count:
                first_null = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
                row = item["start"] + first_null + 1
                raise InputError(
                    item["path"], f"train_id is null ({ids.null_count} null(s))", row=row, field="train_id"
                )
            n = len(ids)
            parts.append(
                pa.table(
                    {
                        "hash": pa.array(hash_ids(ids), pa.uint64()),
                        "fragment": pa.array(np.full(n, item["index"], np.uint32)),
                        "row": pa.array(np.arange(n, dtype=np.uint32)),
                    }
                )
            )
        return pa.concat_tables(parts) if parts else pa.table({"hash": pa.array([], pa.uint64())})


@runtime.reraise_user_errors
def check_train_ids(training: TrainingTable, *, partition_rows: int = PARTITION_ROWS) -> None:
    """Raise a one-line InputError (file, row, field) for a null or duplicate `train_id` anywhere."""
    source = source_for(training.layout)
    items = [{**item, "index": i} for i, item in enumerate(source.fragments(training, FRAGMENT_ROWS))]
    partitions = max(1, -(-training.num_rows // partition_rows))
    cluster = runtime.ClusterResources.current()
    plan = runtime.StagePlan.fixed(max(1, min(len(items), int(max(cluster.cpus - 1, 1)))), num_gpus=0.0, num_cpus=1.0)
    with tempfile.TemporaryDirectory(prefix="raymem-ids-") as tmp:
        files = [Path(tmp) / f"{p:05d}.bin" for p in range(partitions)]
        handles = [open(f, "wb") for f in files]  # noqa: SIM115 - closed below
        try:
            for batch in runtime.map_stage(
                "check_train_ids", items, IdHasher, plan, constructor_kwargs={"layout": training.layout}, batch_size=4
            ):
                if not batch.num_rows:
                    continue
                rows = np.empty(batch.num_rows, ROW)
                for name in ROW.names:
                    rows[name] = batch.column(name).to_numpy()
                which = rows["hash"] % np.uint64(partitions)
                for p in np.unique(which):
                    rows[which == p].tofile(handles[int(p)])
        finally:
            for h in handles:
                h.close()
        for f in files:
            _check_partition(np.fromfile(f, ROW), items, source)


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
