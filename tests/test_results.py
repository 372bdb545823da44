"""`raymem query` and `raymem diff` over real published scans (two demo scans, one output root)."""

import json

import pytest

from raymem.cli import main
from raymem.errors import InputError
from raymem.results import diff_scans, run_query

pytestmark = pytest.mark.ray


def test_tables_are_views_by_name(two_scans):
    root, a, b = two_scans
    sql = "select scan_id, count(*) n from labels group by scan_id order by scan_id"
    expected = [{"scan_id": a.scan_id, "n": 6}, {"scan_id": b.scan_id, "n": 12}]
    assert json.loads(run_query(str(root), sql, "json")) == expected  # one JSON array
    assert [json.loads(line) for line in run_query(str(root), sql, "jsonl").splitlines()] == expected
    out = run_query(str(root), "select distinct scan_date, model from generations order by scan_date", "csv")
    assert out.splitlines() == ['"scan_date","model"', '2026-11-27,"sd-tiny"', '2026-11-28,"sd-tiny"']
    table = run_query(str(root), "select scan_id, status from manifests order by scan_id", "table")
    assert "complete" in table and "(2 rows)" in table
    # Hive partitions prune like any column; embeddings come back as plain lists.
    out = run_query(
        str(root), "select len(clip_embedding) d from generations where scan_date = DATE '2026-11-27' limit 1", "json"
    )
    assert json.loads(out) == [{"d": 64}]
    # Cells are printed whole (reasons are long); --max-width cuts them.
    sql = "select reasons from labels order by length(reasons) desc limit 1"
    longest = json.loads(run_query(str(root), sql, "json"))[0]["reasons"]
    assert len(longest) > 60 and longest in run_query(str(root), sql, "table")
    assert longest not in run_query(str(root), sql, "table", max_width=40)


def test_query_errors_are_one_line_and_exit_2(two_scans, tmp_path, capsys):
    root, _, _ = two_scans
    assert main(["query", "selec 1", "--output", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('raymem: error: SQL error: Parser Error: syntax error at or near "selec"') and "\n" not in err
    assert main(["query", "select * from lables", "--output", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "lables does not exist" in err and "tables under" in err and "\n" not in err
    assert main(["query", "select 1", "--output", str(tmp_path / "none")]) == 2
    assert "no scan outputs here" in capsys.readouterr().err


@pytest.mark.parametrize(
    "sql",
    [
        "select * from read_csv('/etc/passwd')",
        "select * from read_text('/etc/passwd')",
        "copy (select * from labels) to '{tmp}/leak.csv'",
        "attach '{tmp}/other.db'",
        "install httpfs",
        "set enable_external_access = true",
    ],
)
def test_query_is_confined_to_the_scan_tables(two_scans, tmp_path, capsys, sql):
    root, _, _ = two_scans
    assert main(["query", sql.format(tmp=tmp_path), "--output", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raymem: error:") and "\n" not in err and "root:" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_diff_finds_new_MU_prompts_and_can_fail_a_nightly_check(two_scans, capsys):
    root, a, b = two_scans
    d = diff_scans(str(root), a.scan_id, str(root), b.scan_id)
    new = {p["prompt_id"]: p for p in d["new_mu_prompts"]}
    assert "captain" in new and new["captain"]["was"] == "absent" and "Captain Mira" in d["new_mu_entities"]
    assert "lighthouse" not in new  # MU in both scans: not new
    assert sorted(d["prompts_added"]) == ["captain", "kite", "mill"] and d["prompts_removed"] == []
    assert main(["diff", a.scan_id, b.scan_id, "--output", str(root)]) == 0
    assert "new MU prompts:" in capsys.readouterr().out
    assert main(["diff", a.scan_id, b.scan_id, "--output", str(root), "--fail-on-new-mu"]) == 3
    assert "new MU findings" in capsys.readouterr().err
    # A scan against itself has nothing new.
    assert main(["diff", b.scan_id, b.scan_id, "--output", str(root), "--fail-on-new-mu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_mu_prompts"] == []


def test_unknown_scan_id(two_scans, capsys):
    root, a, _ = two_scans
    with pytest.raises(InputError, match="no scan 'nope'"):
        diff_scans(str(root), "nope", str(root), a.scan_id)
    assert main(["diff", "nope", a.scan_id, "--output", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"no scan 'nope' under {root}; scans here: " in err and a.scan_id in err and "\n" not in err
    assert main(["diff", "../../etc/passwd", a.scan_id, "--output", str(root)]) == 2
    assert "not a scan id: '../../etc/passwd'" in capsys.readouterr().err


def test_latest_names_the_newest_complete_scan(two_scans, capsys):
    root, a, b = two_scans
    assert main(["diff", a.scan_id, "latest", "--output", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["after"] == b.scan_id
