"""Prompt sets: read Parquet, JSONL or CSV into validated `Prompt` rows.

Columns: `prompt_id`, `prompt`, `entity` (required); `entity_class` (the class noun used as the null,
e.g. "a man" for a named person), `explicit_elements` and `implicit_elements` (lists of strings;
in CSV a JSON array or a ';'-separated string), `requests_work` (boolean: the prompt asks for this
specific work -- a poster, a painting, a logo -- so a copy of it is what the user expected). Every
problem is reported as `<file>: row N, field 'x': problem`; rows are numbered from 1 in file order (JSONL: by line).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.errors import InputError
from raymem.schema import PROMPTS

log = logging.getLogger(__name__)

REQUIRED = ("prompt_id", "prompt", "entity")
OPTIONAL = ("entity_class", "explicit_elements", "implicit_elements", "requests_work")
LIST_FIELDS = ("explicit_elements", "implicit_elements")


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    prompt: str
    entity: str
    entity_class: str = ""
    explicit_elements: tuple[str, ...] = field(default_factory=tuple)
    implicit_elements: tuple[str, ...] = field(default_factory=tuple)
    requests_work: bool = False  # the prompt names a specific work and asks for it (a requested copy)


def read_records(source: str, data: bytes) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """(column names, [(row number, record)]) for the file's format."""
    suffix = PurePosixPath(source).suffix.lower()
    if suffix == ".parquet":
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(source, f"not a readable Parquet file: {err}") from None
        return table.column_names, list(enumerate(table.to_pylist(), start=1))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(source, f"not UTF-8 text (byte {err.start})") from None
    if suffix in (".jsonl", ".ndjson"):
        rows, columns = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(source, f"invalid JSON: {err.msg} (column {err.colno})", row=number) from None
            if not isinstance(record, dict):
                raise InputError(source, f"expected a JSON object, got {type(record).__name__}", row=number)
            for key in record:
                if key not in columns:
                    columns.append(key)
            rows.append((number, record))
        return columns, rows
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        columns = list(reader.fieldnames or [])
        rows = []
        for number, record in enumerate(reader, start=1):
            if None in record:
                raise InputError(source, "more values than header columns", row=number)
            rows.append((number, {k: (v if v != "" else None) for k, v in record.items()}))
        return columns, rows
    raise InputError(source, f"unsupported format '{suffix}' (use .parquet, .jsonl or .csv)")


def _text(source: str, number: int, name: str, value: Any, *, required: bool, allow_int: bool = False) -> str:
    if value is None:
        if required:
            raise InputError(source, "value is missing", row=number, field=name)
        return ""
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InputError(source, f"expected a string, got {type(value).__name__}", row=number, field=name)
    value = value.strip()
    if required and not value:
        raise InputError(source, "value is empty", row=number, field=name)
    return value


def _flag(source: str, number: int, name: str, value: Any) -> bool:
    """A boolean column: true/false (CSV: true, false, 1, 0, yes, no or empty)."""
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InputError(source, f"expected true or false, got {value!r}", row=number, field=name)


def _elements(source: str, number: int, name: str, value: Any, from_csv: bool) -> tuple[str, ...]:
    if value is None:
        return ()
    if from_csv and isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise InputError(source, f"invalid JSON list: {err.msg}", row=number, field=name) from None
        else:
            value = [part for part in stripped.split(";")]
    if not isinstance(value, (list, tuple)):
        raise InputError(source, f"expected a list of strings, got {type(value).__name__}", row=number, field=name)
    out = []
    for item in value:
        if not isinstance(item, str):
            raise InputError(source, f"expected a list of strings, found {type(item).__name__}", row=number, field=name)
        if item.strip():
            out.append(item.strip())
    return tuple(dict.fromkeys(out))


def read_prompts(source: str) -> list[Prompt]:
    """Read and validate a prompt set (local path or s3:// URI)."""
    try:
        data = uris.read_bytes(source)
    except FileNotFoundError:
        raise InputError(source, "prompt set not found") from None
    except OSError as err:
        raise InputError(source, f"cannot read prompt set: {err}") from None
    columns, records = read_records(source, data)
    if not records:  # before the column check: an empty JSONL file has no columns at all
        raise InputError(source, "the prompt set has no rows")
    for name in REQUIRED:
        if name not in columns:
            raise InputError(source, "required column is missing", field=name)
    unknown = [c for c in columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        log.warning("%s: ignoring unknown columns %s", source, unknown)
    from_csv = source.lower().endswith(".csv")
    prompts: list[Prompt] = []
    first_row: dict[str, int] = {}
    for number, record in records:
        prompt_id = _text(source, number, "prompt_id", record.get("prompt_id"), required=True, allow_int=True)
        if prompt_id in first_row:
            raise InputError(
                source,
                f"duplicate id '{prompt_id}' (first at row {first_row[prompt_id]})",
                row=number,
                field="prompt_id",
            )
        first_row[prompt_id] = number
        prompts.append(
            Prompt(
                prompt_id=prompt_id,
                prompt=_text(source, number, "prompt", record.get("prompt"), required=True),
                entity=_text(source, number, "entity", record.get("entity"), required=True),
                entity_class=_text(source, number, "entity_class", record.get("entity_class"), required=False),
                explicit_elements=_elements(
                    source, number, "explicit_elements", record.get("explicit_elements"), from_csv
                ),
                implicit_elements=_elements(
                    source, number, "implicit_elements", record.get("implicit_elements"), from_csv
                ),
                requests_work=_flag(source, number, "requests_work", record.get("requests_work")),
            )
        )
    return prompts


def prompts_table(prompts: list[Prompt], scan_id: str | None = None) -> pa.Table:
    """The published `prompts` table (also a normalised copy of any prompt set)."""
    return pa.Table.from_pylist(
        [
            {
                "scan_id": scan_id,
                "prompt_id": p.prompt_id,
                "prompt": p.prompt,
                "entity": p.entity,
                "entity_class": p.entity_class,
                "explicit_elements": list(p.explicit_elements),
                "implicit_elements": list(p.implicit_elements),
                "requests_work": p.requests_work,
            }
            for p in prompts
        ],
        schema=PROMPTS,
    )
