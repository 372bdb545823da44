"""The Python API over real published scans: load the latest, query, pandas on request."""

import pytest

import raymem

pytestmark = pytest.mark.ray


def test_load_the_latest_scan_and_query_it(two_scans):
    root, a, b = two_scans
    tables = raymem.load(root)  # latest: scan B (the newer date)
    assert set(tables) >= {"labels", "generations", "entity_tallies", "entities"}
    assert set(tables["labels"].column("scan_id").to_pylist()) == {b.scan_id}
    older = raymem.load(root, scan=a.scan_id, tables=["labels"], pandas=True)
    assert list(older) == ["labels"] and set(older["labels"]["scan_id"]) == {a.scan_id}
    counts = raymem.query(root, "select scan_id, count(*) n from labels group by scan_id order by scan_id")
    assert counts.to_pylist() == [{"scan_id": a.scan_id, "n": 6}, {"scan_id": b.scan_id, "n": 12}]
    frame = raymem.query(str(root), "select entity from entity_tallies", pandas=True)
    assert len(frame) == 9  # 3 entities in A, 6 in B


def test_the_api_names_stay_functions_after_the_modules_load():
    import raymem.pipeline  # noqa: F401 - the submodules have other names than the API functions
    import raymem.results  # noqa: F401

    assert callable(raymem.scan) and callable(raymem.load) and callable(raymem.query)
