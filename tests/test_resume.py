"""Resume and fault tolerance: a killed driver resumes without recomputing finished units; a killed
generation actor is replaced and the scan still accounts for every unit exactly once."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from raymem.config import parse_config
from raymem.pipeline import run_scan
from tests.conftest import REPO, demo_raw_config

pytestmark = pytest.mark.ray


def config(demo_root, out: Path, **generation) -> dict:
    raw = demo_raw_config(demo_root)
    raw["output"] = {"uri": str(out), "scan_date": "2026-11-28"}
    raw["generation"].update(seeds_per_prompt=4, batch_size=2, **generation)
    raw["signals"]["null_seeds"] = 0
    return raw


def store_rows(out: Path) -> pa.Table:
    files = sorted((out / "_units" / "model=sd-tiny" / "generations").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=["unit_id", "status", "computed_at"]) for f in files])


def published(out: Path) -> list[dict]:
    return pads.dataset(str(out / "generations"), format="parquet", partitioning="hive").to_table().to_pylist()


def kill_process_tree(proc: subprocess.Popen) -> None:
    parent = psutil.Process(proc.pid)
    family = [parent, *parent.children(recursive=True)]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def test_killed_driver_resumes_without_recomputing(demo_root, tmp_path):
    out = tmp_path / "out"
    raw = config(demo_root, out)
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "raymem.cli", "scan", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store = out / "_units" / "model=sd-tiny" / "generations"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(store.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, "the scan ended before it could be interrupted"
        time.sleep(0.2)
    kill_process_tree(proc)  # the driver and the local Ray it started, mid-generation
    before = store_rows(out)
    done = dict(zip(before.column("unit_id").to_pylist(), before.column("computed_at").to_pylist()))
    assert 0 < len(done) < 24
    manifest = next((out / "manifests").glob("*.json")).read_text()
    assert '"status": "running"' in manifest and not (out / "generations").exists()  # visible as incomplete

    result = run_scan(parse_config(raw))
    assert result.counts["units_generated"] == 24 - len(done) and result.counts["units_reused"] == len(done)
    rows = published(out)
    assert len(rows) == 24 and len({r["unit_id"] for r in rows}) == 24  # every unit exactly once
    for r in rows:
        if r["unit_id"] in done:  # finished before the kill: reused, not recomputed
            assert r["computed_at"] == done[r["unit_id"]]


def test_killed_generation_actor_is_replaced_and_nothing_is_lost(local_ray, demo_root, tmp_path):
    out = tmp_path / "out"
    store = out / "_units" / "model=sd-tiny" / "generations"
    killed = []

    def kill_one_actor():
        deadline = time.time() + 300
        while time.time() < deadline and not list(store.glob("part-*.parquet")):
            time.sleep(0.1)
        for p in psutil.process_iter(["cmdline"]):
            if "MapBatches(GenerateEmbed)" in " ".join(p.info["cmdline"] or []):
                p.kill()
                killed.append(p.pid)
                return

    watcher = threading.Thread(target=kill_one_actor, daemon=True)
    watcher.start()
    result = run_scan(parse_config(config(demo_root, out)))
    watcher.join()
    assert killed, "no generation actor was found to kill"
    rows = published(out)
    assert len(rows) == 24 and len({r["unit_id"] for r in rows}) == 24 and result.counts["units_failed"] == 0
    workers = {r["worker"].rsplit(":", 1)[1] for r in rows}
    assert workers - {str(killed[0])}  # a replacement actor did the rest (re-running the interrupted chunk)
