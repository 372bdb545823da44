"""Reading published scans back: `raymem query` (DuckDB over the tables), `raymem diff`, shared loaders.

Tables are opened as pyarrow datasets with hive partitioning (`scan_date` as a date, `model` as a
string) from a local directory or an s3:// prefix, and registered in DuckDB as views named after the
tables, plus `manifests` (one row per scan). A table is the files that complete committed manifests list
(docs/outputs.md), so a query never sees a half-written or superseded attempt.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.dataset as pads

from raymem import uri as uris
from raymem.errors import InputError, RaymemError
from raymem.outputs import committed_manifests, inside, resolve_scan
from raymem.schema import PUBLISHED_TABLES

PARTITIONING = pads.partitioning(pa.schema([("scan_date", pa.date32()), ("model", pa.string())]), flavor="hive")


class QueryError(RaymemError):
    exit_code = 2


def committed_files(root: str, table: str) -> list[str]:
    """The files of `table` that complete committed manifests list (the reader contract)."""

    folder = uris.join(root, table)
    files = [
        m["tables"][table]
        for m in committed_manifests(root)
        if m.get("status") == "complete" and table in m.get("tables", {})
    ]
    return sorted(f for f in files if inside(f, folder))


def open_table(root: str, table: str) -> pads.Dataset | None:
    uri = uris.join(root, table)
    files = committed_files(root, table)
    if not files:
        return None
    fs, _ = uris.filesystem(uri)
    paths = [f[len("s3://") :] if uris.is_remote(f) else f for f in files]
    base = uri[len("s3://") :] if uris.is_remote(uri) else uri
    return pads.dataset(paths, filesystem=fs, format="parquet", partitioning=PARTITIONING, partition_base_dir=base)


def manifests_table(root: str) -> pa.Table:
    rows = [
        {
            "scan_id": m.get("scan_id"),
            "name": m.get("name"),
            "status": m.get("status"),
            "scan_date": m.get("scan_date"),
            "model": m.get("model"),
            "model_id": m.get("model_id"),
            "config_hash": m.get("config_hash"),
            "started_at": m.get("started_at"),
            "written_at": m.get("written_at"),
            "error": m.get("error"),
            "counts": json.dumps(m.get("counts") or {}),
        }
        for m in committed_manifests(root)
    ]
    schema = pa.schema(
        [
            (n, pa.string())
            for n in (
                "scan_id",
                "name",
                "status",
                "scan_date",
                "model",
                "model_id",
                "config_hash",
                "started_at",
                "written_at",
                "error",
                "counts",
            )
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def connect(root: str):
    """A DuckDB connection with every table under `root` registered as a view."""
    import duckdb

    if not uris.exists(root):
        raise InputError(root, "no scan outputs here")
    con = duckdb.connect()
    found = []
    for table in PUBLISHED_TABLES:
        dataset = open_table(root, table)
        if dataset is not None:
            con.register(table, dataset)
            found.append(table)
    con.register("manifests", manifests_table(root))
    # Confined to the registered tables: no file reads or writes (read_csv, COPY ... TO, ATTACH), no
    # extensions, and the setting cannot be switched back by the query.
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con, found


def run_query(root: str, sql: str, fmt: str = "table", max_width: int | None = None) -> str:
    return format_table(query_table(root, sql), fmt, max_width)


def query_table(root: str, sql: str) -> pa.Table:
    """SQL over the root's committed tables as an Arrow table; every DuckDB error is one QueryError line."""
    import duckdb

    con, found = connect(root)
    try:
        result = con.sql(sql)
        table = result.arrow() if result is not None else pa.table({})
    except duckdb.CatalogException as err:
        missing = str(err).splitlines()[0]
        raise QueryError(f"{missing} (tables under {root}: {', '.join(found + ['manifests'])})") from None
    except duckdb.PermissionException as err:
        raise QueryError(f"refused: queries read only the scan tables ({str(err).splitlines()[0]})") from None
    except duckdb.Error as err:
        raise QueryError(f"SQL error: {str(err).splitlines()[0]}") from None
    if isinstance(table, pa.RecordBatchReader):
        table = table.read_all()
    return table


def format_table(table: pa.Table, fmt: str, max_width: int | None = None) -> str:
    """table (aligned, full cells unless `max_width`), csv, json (one array) or jsonl (a row a line)."""
    if fmt == "json":
        return json.dumps(table.to_pylist(), default=str) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist())
    if fmt == "csv":
        import pyarrow.csv as pacsv

        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        return buf.getvalue().decode()
    rows = [[_cell(v, max_width) for v in row.values()] for row in table.to_pylist()]
    names = table.column_names
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(lines) + "\n"


def _cell(value, max_width: int | None = None) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if max_width is None or len(text) <= max_width else text[: max(1, max_width - 3)] + "..."


def scan_table(root: str, scan_id: str, table: str) -> pa.Table:
    """One table of one complete scan (an unknown or incomplete scan is a one-line error)."""
    from raymem.outputs import read_scan_table

    return read_scan_table(root, scan_id, table)


def diff_scans(root_a: str, scan_a: str, root_b: str, scan_b: str, rate_change: float = 0.1) -> dict:
    """What changed from scan A (before) to scan B (after): new MU prompts/entities, rate changes.
    Either may be `latest` (the newest complete scan under its root)."""
    scan_a, scan_b = resolve_scan(root_a, scan_a), resolve_scan(root_b, scan_b)
    ent_a = {r["entity"]: r for r in scan_table(root_a, scan_a, "entity_tallies").to_pylist()}
    ent_b = {r["entity"]: r for r in scan_table(root_b, scan_b, "entity_tallies").to_pylist()}
    pr_a = {r["prompt_id"]: r for r in scan_table(root_a, scan_a, "prompt_tallies").to_pylist()}
    pr_b = {r["prompt_id"]: r for r in scan_table(root_b, scan_b, "prompt_tallies").to_pylist()}

    def has_mu(row):
        return row is not None and (row.get("n_MU") or 0) > 0

    new_mu_prompts = [
        {
            "prompt_id": p,
            "entity": r["entity"],
            "n_MU": r["n_MU"],
            "max_replication_score": r["max_replication_score"],
            "was": "absent" if p not in pr_a else "no MU",
        }
        for p, r in sorted(pr_b.items())
        if has_mu(r) and not has_mu(pr_a.get(p))
    ]
    new_mu_entities = [e for e, r in sorted(ent_b.items()) if has_mu(r) and not has_mu(ent_a.get(e))]
    changes = []
    for e in sorted(set(ent_a) | set(ent_b)):
        a, b = ent_a.get(e), ent_b.get(e)
        for label in ("MU", "MI", "ME", "none"):
            ra = (a or {}).get(f"rate_{label}")
            rb = (b or {}).get(f"rate_{label}")
            if ra is None or rb is None:
                continue
            if abs(rb - ra) >= rate_change:
                changes.append({"entity": e, "label": label, "before": ra, "after": rb, "change": rb - ra})
    newly_memorized = [
        p for p, r in sorted(pr_b.items()) if r["memorized_prompt"] and not (pr_a.get(p) or {}).get("memorized_prompt")
    ]
    return {
        "before": scan_a,
        "after": scan_b,
        "new_mu_prompts": new_mu_prompts,
        "new_mu_entities": new_mu_entities,
        "rate_changes": changes,
        "newly_memorized_prompts": newly_memorized,
        "prompts_added": sorted(set(pr_b) - set(pr_a)),
        "prompts_removed": sorted(set(pr_a) - set(pr_b)),
    }


def format_diff(d: dict) -> str:
    lines = [f"diff {d['before']} -> {d['after']}"]
    lines.append(f"new MU prompts: {len(d['new_mu_prompts'])}")
    for p in d["new_mu_prompts"]:
        lines.append(
            f"  {p['prompt_id']} ({p['entity']}): {p['n_MU']} MU image(s), top replication "
            f"{p['max_replication_score']:.3f}; before: {p['was']}"
        )
    lines.append(f"new MU entities: {', '.join(d['new_mu_entities']) or 'none'}")
    lines.append(f"rate changes (>= threshold): {len(d['rate_changes'])}")
    for c in d["rate_changes"]:
        lines.append(f"  {c['entity']} {c['label']}: {c['before']:.2f} -> {c['after']:.2f} ({c['change']:+.2f})")
    lines.append(f"newly memorized prompts: {', '.join(d['newly_memorized_prompts']) or 'none'}")
    lines.append(f"prompts added: {len(d['prompts_added'])}, removed: {len(d['prompts_removed'])}")
    return "\n".join(lines) + "\n"
