"""Whole-table passes riding along the exact join's read: the same results as on a read of their own,
the same one-line errors, and no spill left behind."""

import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem import join as joins
from raymem import sources
from raymem.encoders import l2_normalize
from raymem.entity_stats import EntityStatsPass, _hash, entity_stats
from raymem.errors import InputError
from raymem.passes import packed_row, struct_of, unpacked
from raymem.schema import embedding_array, stored_embedding_array
from raymem.train_ids import TrainIdCheck, check_train_ids

pytestmark = pytest.mark.ray


def write_tagged(root, rng, sizes, ids=None, storage="list", dim=16, same_as=None):
    """Parquet files whose rows carry 0-2 entity tags of e0..e4 (some null, some repeated), rows not
    normalised; `same_as` {row: other row} gives a row another's embedding. Returns the ids, the
    embeddings as written and each row's tags."""
    root.mkdir(parents=True, exist_ok=True)
    total = sum(sizes)
    ids = ids if ids is not None else [f"t{i:05d}" for i in range(total)]
    clip = l2_normalize(rng.standard_normal((total, dim))) * rng.uniform(0.5, 2.0, (total, 1)).astype(np.float32)
    for row, other in (same_as or {}).items():
        clip[row] = clip[other]
    tags = [
        None if rng.random() < 0.1 else [f"e{j}" for j in rng.integers(0, 5, rng.integers(0, 3))] for _ in range(total)
    ]
    start = 0
    for n, size in enumerate(sizes):
        part = slice(start, start + size)
        pq.write_table(
            pa.table(
                {
                    "train_id": pa.array(ids[part], pa.string()),
                    "clip_embedding": stored_embedding_array(clip[part], dim, storage),
                    "entities": pa.array(tags[part], pa.list_(pa.string())),
                    "image_uri": [f"/images/{t}.png" for t in ids[part]],
                }
            ),
            root / f"part-{n:03d}.parquet",
            row_group_size=23,
        )
        start += size
    return ids, clip, tags


def expected_stats(ids, clip, tags, entity, work_copies=0):
    """Counts, centroid and work-copy sample computed directly from the rows as written."""
    rows = [i for i, t in enumerate(tags) for e in (t or ()) if e == entity]  # a repeated tag counts twice
    total = clip[rows].astype(np.float64).sum(axis=0) if rows else None
    centroid = (total / np.linalg.norm(total)).astype(np.float32) if rows else None
    sample = sorted({ids[i] for i in rows}, key=_hash)[:work_copies]
    return len(rows), centroid, sample


@pytest.mark.parametrize("storage", ["list", "packed"])
def test_passes_in_the_join_give_what_their_own_reads_give(local_ray, tmp_path, storage):
    """Entity counts, centroids and work copies, and a clean id check, computed on the exact join's read
    equal what the standalone passes compute and what the rows say; the neighbours are unchanged."""
    rng = np.random.default_rng(21)
    ids, clip, tags = write_tagged(tmp_path / "train", rng, [70, 45, 90], storage=storage)
    training = sources.inspect_training(str(tmp_path / "train"), {"clip": 16})
    q = {"u": joins.Queries([f"q{i}" for i in range(6)], {"clip": l2_normalize(rng.standard_normal((6, 16)))})}
    wanted = {"e0", "e1", "e3", "nobody"}
    riding = EntityStatsPass(training, wanted, works={"e1", "e3"}, work_copies=4)
    with_passes = joins.nearest_neighbours(
        training, q, 5, batch_rows=40, passes=[TrainIdCheck(training.num_rows, partition_rows=50), riding]
    )
    alone = entity_stats(training, wanted, works={"e1", "e3"}, work_copies=4)
    fused = riding.result()
    for e in wanted:
        count, centroid, sample = expected_stats(ids, clip, tags, e, 4 if e in {"e1", "e3"} else 0)
        for got in (fused[e], alone[e]):
            assert got.count == count
            if centroid is None:
                assert got.centroid is None
            else:
                np.testing.assert_allclose(got.centroid, centroid, rtol=1e-6, atol=1e-7)
            assert [t for t, _ in got.work_copies] == sample
            assert all(u == f"/images/{t}.png" for t, u in got.work_copies)
    plain = joins.nearest_neighbours(training, q, 5, batch_rows=40)
    assert [[(r["train_id"], r["score"]) for r in rows] for rows in with_passes["u"]["clip"].rows] == [
        [(r["train_id"], r["score"]) for r in rows] for rows in plain["u"]["clip"].rows
    ]


def test_the_join_names_a_duplicate_id_far_apart_and_one_in_a_top_k(local_ray, tmp_path, monkeypatch):
    """A train_id twice: the id check riding along the join names both rows, whether the two rows are
    far apart (never in one top-k) or both land in a query's top-k (where the join's merge sees them
    first); a null id is named by the actor that reads it. No spill is left behind."""
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    rng = np.random.default_rng(2)
    ids = [f"t{i:04d}" for i in range(150)]
    ids[131] = "t0017"  # file part-002 row 32 repeats part-000 row 18, with the same embedding
    _, clip, _ = write_tagged(tmp_path / "dup", rng, [50, 50, 50], ids=ids, same_as={131: 17})
    training = sources.inspect_training(str(tmp_path / "dup"), {"clip": 16})
    far = joins.Queries(["far"], {"clip": l2_normalize(-clip[17:18])})  # t0017 is in no top-k
    near = joins.Queries(["near"], {"clip": l2_normalize(clip[17:18])})  # both copies in its top-k
    expected = (
        f"{tmp_path / 'dup' / 'part-002.parquet'}: row 32, field 'train_id': duplicate train_id 't0017' "
        f"(also at {tmp_path / 'dup' / 'part-000.parquet'} row 18)"
    )
    for queries in ({"q": far}, {"q": near}):
        with pytest.raises(InputError) as err:
            joins.nearest_neighbours(training, queries, 3, batch_rows=20, passes=[TrainIdCheck(training.num_rows)])
        assert str(err.value) == expected
    with pytest.raises(InputError) as err:  # without the check, the merge's own message (no rows)
        joins.nearest_neighbours(training, {"q": near}, 3, batch_rows=20)
    assert "duplicate train_id 't0017'" in str(err.value) and "row" not in str(err.value)

    ids = [f"n{i}" for i in range(60)]
    ids[44] = None
    write_tagged(tmp_path / "null", rng, [30, 30], ids=ids)
    training = sources.inspect_training(str(tmp_path / "null"), {"clip": 16})
    with pytest.raises(InputError, match=r"part-001.parquet: row 15, field 'train_id': train_id is null"):
        joins.nearest_neighbours(training, {"q": far}, 3, passes=[TrainIdCheck(training.num_rows)])
    with pytest.raises(InputError, match=r"part-001.parquet: row 15, field 'train_id': train_id is null"):
        check_train_ids(training)
    assert list(spill.iterdir()) == []


def test_a_worker_row_carries_every_part_whatever_an_item_held():
    """Worker output is one row per call: each part a list<struct> of one type (absent columns null), so
    calls concatenate and unpack to the rows that went in, an empty part included."""
    schema = pa.schema([("a", pa.int64()), ("b", pa.list_(pa.string()))])
    full = pa.table({"a": [1, 2], "b": [["x"], None]}, schema=schema)
    rows = pa.concat_tables(
        [
            packed_row({"p": full}, {"p": struct_of(schema)}, rows_scored=2),
            packed_row({"p": schema.empty_table()}, {"p": struct_of(schema)}, rows_scored=0),
            packed_row({"p": full.slice(1)}, {"p": struct_of(schema)}, rows_scored=1),
        ]
    )
    assert rows.column("rows_scored").to_pylist() == [2, 0, 1]
    assert unpacked(rows, "p").to_pylist() == full.to_pylist() + full.slice(1).to_pylist()


def test_entity_partials_count_repeated_and_skip_null_tags():
    """One item's partial: a tag repeated in a row counts twice (as the row-by-row count did), null lists
    and null tags count nothing, and unwanted entities are not carried."""

    class Table:
        dims = {"clip": 2}
        columns = ["entities", "clip_embedding", "train_id"]

    x = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    table = pa.table(
        {
            "entities": pa.array([["a", "a"], None, ["b", None, "zz"]], pa.list_(pa.string())),
            "clip_embedding": embedding_array(x, 2),
            "train_id": ["r0", "r1", "r2"],
        }
    )
    part = EntityStatsPass(Table(), {"a", "b", "c"}).partial(table, {})
    assert part.column("entity").to_pylist() == ["a", "b", "c"]
    assert part.column("n").to_pylist() == [2, 1, 0]
    assert part.column("sum").to_pylist() == [[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
