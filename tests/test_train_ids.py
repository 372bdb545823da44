"""Null and duplicate train_ids anywhere in the training table, found with bounded memory."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem.errors import InputError
from raymem.schema import embedding_array
from raymem.sources import inspect_training
from raymem.train_ids import ROW, _check_partition, check_train_ids

pytestmark = pytest.mark.ray


def write(root, name, ids, row_group_size=None):
    root.mkdir(parents=True, exist_ok=True)
    x = np.eye(len(ids), 8, dtype=np.float32) + 0.01
    table = pa.table({"train_id": pa.array(ids, pa.string()), "clip_embedding": embedding_array(x, 8)})
    pq.write_table(table, root / name, row_group_size=row_group_size)


def test_clean_tables_pass_over_many_partitions(local_ray, tmp_path):
    for f in range(3):
        write(tmp_path / "t", f"part-{f}.parquet", [f"f{f}-{i}" for i in range(40)], row_group_size=7)
    check_train_ids(inspect_training(str(tmp_path / "t"), {}), partition_rows=10)  # 12 partitions


def test_a_duplicate_in_files_far_apart_names_both_rows(local_ray, tmp_path):
    write(tmp_path / "t", "part-0.parquet", [f"a{i}" for i in range(30)], row_group_size=8)
    write(tmp_path / "t", "part-1.parquet", [f"b{i}" for i in range(30)])
    write(tmp_path / "t", "part-2.parquet", [f"c{i}" for i in range(25)] + ["a17"], row_group_size=8)
    training = inspect_training(str(tmp_path / "t"), {})
    with pytest.raises(InputError) as err:
        check_train_ids(training, partition_rows=20)
    assert str(err.value) == (
        f"{tmp_path / 't' / 'part-2.parquet'}: row 26, field 'train_id': duplicate train_id 'a17' "
        f"(also at {tmp_path / 't' / 'part-0.parquet'} row 18)"
    )


def test_a_duplicate_within_one_file_and_a_null_id(local_ray, tmp_path):
    write(tmp_path / "dup", "part-0.parquet", ["x", "y", "z", "y"])
    with pytest.raises(
        InputError,
        match=r"part-0.parquet: row 4, field 'train_id': duplicate train_id 'y' \(also at .*part-0.parquet row 2\)",
    ):
        check_train_ids(inspect_training(str(tmp_path / "dup"), {}))
    write(tmp_path / "null", "part-0.parquet", ["x", "y", None, None], row_group_size=2)
    with pytest.raises(InputError, match=r"part-0.parquet: row 3, field 'train_id': train_id is null"):
        check_train_ids(inspect_training(str(tmp_path / "null"), {}))


def test_equal_hashes_of_different_ids_are_not_duplicates():
    class Source:  # two fragments whose ids differ
        def read(self, item, columns):
            return pa.table({"train_id": item["ids"]})

    items = [{"path": "a.parquet", "start": 0, "ids": ["p", "q"]}, {"path": "b.parquet", "start": 0, "ids": ["r", "q"]}]
    rows = np.array([(7, 0, 0), (7, 1, 0)], ROW)  # a forced collision: 'p' and 'r'
    _check_partition(rows, items, Source())
    rows = np.array([(9, 0, 1), (9, 1, 1)], ROW)  # the same id 'q' in both
    with pytest.raises(
        InputError, match=r"b.parquet: row 2, field 'train_id': duplicate train_id 'q' \(also at a.parquet row 2\)"
    ):
        _check_partition(rows, items, Source())
