"""The Python API: run a scan and read scans back, as a notebook or a pipeline would.

    import raymem
    result = raymem.scan("configs/demo.yaml")               # or a ScanConfig
    tables = raymem.load("outputs/demo", scan="latest")      # {"labels": pyarrow.Table, ...}
    df = raymem.query("outputs/demo", "SELECT * FROM entity_tallies", pandas=True)

Everything reads committed files only (docs/outputs.md).
"""

from __future__ import annotations

import os

from raymem.schema import PUBLISHED_TABLES


def scan(config, *, rerun_failed: bool = False):
    """Run a scan from a config file path or a `ScanConfig`; returns the `ScanResult`."""
    from raymem.config import ScanConfig, load_config
    from raymem.pipeline import run_scan

    cfg = config if isinstance(config, ScanConfig) else load_config(os.fspath(config))
    return run_scan(cfg, rerun_failed=rerun_failed)


def load(output: str | os.PathLike, scan: str = "latest", tables=None, *, pandas: bool = False) -> dict:
    """The tables of one complete scan (`latest`: the newest), as Arrow tables or pandas frames."""
    from raymem.outputs import read_scan_table, resolve_scan

    root = os.fspath(output)
    scan_id = resolve_scan(root, scan)
    names = list(tables or PUBLISHED_TABLES)
    out = {name: read_scan_table(root, scan_id, name) for name in names}
    return {n: t.to_pandas() for n, t in out.items()} if pandas else out


def query(output: str | os.PathLike, sql: str, *, pandas: bool = False):
    """SQL (DuckDB) over an output root's committed tables, as an Arrow table or a pandas frame."""
    from raymem.results import query_table

    table = query_table(os.fspath(output), sql)
    return table.to_pandas() if pandas else table
