import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem.errors import InputError
from raymem.prompts import Prompt, prompts_table, read_prompts


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = [
    {
        "prompt_id": "a",
        "prompt": "a photo of X",
        "entity": "X",
        "entity_class": "a man",
        "explicit_elements": ["hat"],
        "implicit_elements": ["beard", "hat"],
    },
    {"prompt_id": 2, "prompt": "Y at night", "entity": "Y"},
]


def test_reads_all_three_formats_identically(tmp_path):
    expected = [
        Prompt("a", "a photo of X", "X", "a man", ("hat",), ("beard", "hat")),
        Prompt("2", "Y at night", "Y", "", (), ()),
    ]
    jsonl = write_jsonl(tmp_path / "p.jsonl", GOOD)
    csv = tmp_path / "p.csv"
    csv.write_text(
        "prompt_id,prompt,entity,entity_class,explicit_elements,implicit_elements\n"
        'a,a photo of X,X,a man,hat,"[""beard"", ""hat""]"\n'
        "2,Y at night,Y,,,\n"
    )
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{**GOOD[0]}, {**GOOD[1], "prompt_id": "2"}]), parquet)
    assert read_prompts(jsonl) == expected
    assert read_prompts(str(csv)) == expected
    assert read_prompts(str(parquet)) == expected
    assert prompts_table(expected).num_rows == 2


def test_csv_semicolon_lists(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt_id,prompt,entity,explicit_elements\nx,p,e,a; b ;;c\n")
    assert read_prompts(str(csv))[0].explicit_elements == ("a", "b", "c")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([GOOD[0], {**GOOD[1], "prompt_id": "a"}], "row 2, field 'prompt_id': duplicate id 'a' (first at row 1)"),
        ([{**GOOD[0], "prompt": "   "}], "row 1, field 'prompt': value is empty"),
        ([{**GOOD[0], "prompt": None}], "row 1, field 'prompt': value is missing"),
        ([GOOD[0], {**GOOD[1], "prompt": 42}], "row 2, field 'prompt': expected a string, got int"),
        ([{**GOOD[0], "entity": ["X"]}], "row 1, field 'entity': expected a string, got list"),
        (
            [{**GOOD[0], "explicit_elements": "hat"}],
            "row 1, field 'explicit_elements': expected a list of strings, got str",
        ),
        (
            [{**GOOD[0], "implicit_elements": ["ok", 3]}],
            "row 1, field 'implicit_elements': expected a list of strings, found int",
        ),
        ([{**GOOD[0], "prompt_id": 1.5}], "row 1, field 'prompt_id': expected a string, got float"),
        ([{"prompt_id": "a", "prompt": "p"}], "field 'entity': required column is missing"),
    ],
)
def test_bad_jsonl_rows(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError) as info:
        read_prompts(path)
    assert str(info.value) == f"{path}: {message}"
    assert info.value.exit_code == 2


def test_invalid_json_line_names_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n\n{not json\n")
    with pytest.raises(InputError, match=r"p.jsonl: row 3: invalid JSON"):
        read_prompts(str(path))


def test_csv_problems(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt_id,prompt,entity\na,p,e\nb,,e\n")
    with pytest.raises(InputError, match=r"p.csv: row 2, field 'prompt': value is missing"):
        read_prompts(str(path))
    path.write_text("prompt_id,prompt,entity\na,p,e,extra\n")
    with pytest.raises(InputError, match=r"p.csv: row 1: more values than header columns"):
        read_prompts(str(path))
    path.write_text('prompt_id,prompt,entity,explicit_elements\na,p,e,["x"\n')
    with pytest.raises(InputError, match=r"row 1, field 'explicit_elements': invalid JSON list"):
        read_prompts(str(path))


def test_parquet_wrong_column_type(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": [3], "entity": ["e"]}), path)
    with pytest.raises(InputError, match=r"p.parquet: row 1, field 'prompt': expected a string, got int"):
        read_prompts(str(path))


def test_file_level_problems(tmp_path):
    with pytest.raises(InputError, match="prompt set not found"):
        read_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported format '.txt'"):
        read_prompts(str(tmp_path / "p.txt"))
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=f"{name}: the prompt set has no rows"):
            read_prompts(str(tmp_path / name))
    (tmp_path / "header.csv").write_text("prompt_id,prompt,entity\n")
    with pytest.raises(InputError, match="header.csv: the prompt set has no rows"):
        read_prompts(str(tmp_path / "header.csv"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="bad.parquet: not a readable Parquet file"):
        read_prompts(str(tmp_path / "bad.parquet"))
    (tmp_path / "latin.csv").write_bytes("prompt_id,prompt,entity\na,caf\xe9,e\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompts(str(tmp_path / "latin.csv"))


def test_requests_work_is_a_boolean_column(tmp_path):
    rows = [
        {"prompt_id": "a", "prompt": "the Night Market poster", "entity": "Night Market", "requests_work": True},
        {"prompt_id": "b", "prompt": "a market at night", "entity": "Night Market"},
    ]
    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.requests_work for p in prompts] == [True, False]
    assert prompts_table(prompts).column("requests_work").to_pylist() == [True, False]
    csv = tmp_path / "p.csv"
    csv.write_text("prompt_id,prompt,entity,requests_work\na,the poster,P,yes\nb,a market,P,\nc,x,P,0\n")
    assert [p.requests_work for p in read_prompts(str(csv))] == [True, False, False]
    csv.write_text("prompt_id,prompt,entity,requests_work\na,the poster,P,maybe\n")
    with pytest.raises(InputError, match=r"p.csv: row 1, field 'requests_work': expected true or false, got 'maybe'"):
        read_prompts(str(csv))
