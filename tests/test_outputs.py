"""Publishing: secret values never leave the process; a scan becomes visible whole or not at all,
whatever fails or is killed while it publishes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from raymem.config import parse_config
from raymem.outputs import REDACTED, ScanOutputs, redacted
from raymem.results import committed_files, run_query
from raymem.schema import PUBLISHED_TABLES
from tests.conftest import REPO


def test_env_vars_keep_only_their_names_and_secret_looking_keys_their_presence():
    config = {
        "name": "nightly",
        "ray": {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_abc", "PLAIN": "1"}, "working_dir": "/app"}},
        "storage": {"aws_access_key_id": "AKIA", "Password": "p", "api_key": "k", "token": None, "tokens": []},
        "list": [{"client_secret": "s"}],
    }
    out = redacted(config)
    assert out["ray"]["runtime_env"] == {"env_vars": {"HF_TOKEN": REDACTED, "PLAIN": REDACTED}, "working_dir": "/app"}
    assert out["storage"] == {
        "aws_access_key_id": REDACTED,
        "Password": REDACTED,
        "api_key": REDACTED,
        "token": None,  # unset stays visibly unset
        "tokens": [],
    }
    assert out["list"] == [{"client_secret": REDACTED}] and out["name"] == "nightly"
    assert config["storage"]["api_key"] == "k"  # the input is not modified


# -- snapshot publishing under faults (real scans on a local Ray) ---------------------------------------


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after it runs (not an Exception)."""


def small_scan(demo_raw, out: Path) -> dict:
    raw = {**demo_raw, "output": {"uri": str(out), "scan_date": "2026-11-28"}}
    raw["generation"] = {**raw["generation"], "seeds_per_prompt": 2}
    raw["signals"] = {**raw.get("signals", {}), "null_seeds": 2}
    return raw


def visible(root: Path) -> dict:
    """What a reader sees: the committed manifest of the one scan, its files, and a query over them."""
    (manifest,) = [json.loads(p.read_text()) for p in (root / "manifests").glob("*.json")]
    files = {t: committed_files(str(root), t) for t in PUBLISHED_TABLES}
    sql = " union all ".join(f"select '{t}' t, count(*) n from {t}" for t in PUBLISHED_TABLES)
    counts = run_query(str(root), sql, "jsonl") if all(files.values()) else None
    return {"manifest": manifest, "files": files, "counts": counts}


def attempt(cfg, rows: int, stop_after: str | None = None) -> dict:
    """One publishing attempt of scan 'nightly-…' whose every table has `rows` rows; `stop_after` kills
    it right after that step (a table written, or the manifest committed)."""
    outputs = ScanOutputs(cfg, "nightly-2026-11-28-0123456789")

    def hook(name):
        if name == stop_after:
            raise Killed(name)

    outputs._after_write = hook
    outputs.write_manifest("running")  # as run_scan does before any work
    for name in PUBLISHED_TABLES:
        outputs.stage(name, pa.table({"scan_id": [outputs.scan_id] * rows, "row": list(range(rows))}))
    manifest = outputs.write_manifest("complete", tables=outputs.tables())
    outputs.remove_unlisted(manifest)
    return manifest


def publishing_config(out: Path):
    raw = {
        "name": "nightly",
        "model": {"id": "org/model"},
        "prompts": "p.jsonl",
        "training": {"embeddings": "t"},
        "output": {"uri": str(out), "scan_date": "2026-11-28"},
    }
    return parse_config(raw)


@pytest.mark.parametrize("step", [*PUBLISHED_TABLES, "manifest"])
def test_a_kill_at_any_publish_step_shows_the_old_complete_scan_or_the_new_one(tmp_path, step):
    cfg = publishing_config(tmp_path / "out")
    old = attempt(cfg, rows=3)
    before = visible(tmp_path / "out")
    assert {json.loads(r)["n"] for r in before["counts"].splitlines()} == {3}
    with pytest.raises(Killed):
        attempt(cfg, rows=5, stop_after=step)
    after = visible(tmp_path / "out")
    counts = {json.loads(r)["n"] for r in after["counts"].splitlines()}
    if step == "manifest":  # committed: the new attempt, whole
        assert after["manifest"]["attempt"] != old["attempt"] and counts == {5}
    else:  # not committed: the old attempt, exactly
        assert after == before
    # The killed attempt's files stay on disk, invisible, until the next commit removes them.
    new = attempt(cfg, rows=7)
    listed = {f for t in PUBLISHED_TABLES for f in committed_files(str(tmp_path / "out"), t)}
    on_disk = {str(p) for t in PUBLISHED_TABLES for p in (tmp_path / "out" / t).rglob("*.parquet")}
    assert on_disk == listed and len(listed) == len(PUBLISHED_TABLES)
    assert {json.loads(r)["n"] for r in visible(tmp_path / "out")["counts"].splitlines()} == {7}
    history = sorted(p.name for p in (tmp_path / "out" / "_attempts" / new["scan_id"]).glob("*.json"))
    assert len(history) == 3


@pytest.fixture(scope="module")
def complete_scan(local_ray, demo_root, tmp_path_factory):
    from raymem.pipeline import run_scan
    from tests.conftest import demo_raw_config

    out = tmp_path_factory.mktemp("publish") / "out"
    raw = small_scan(demo_raw_config(demo_root), out)
    result = run_scan(parse_config(raw))
    return raw, out, result


@pytest.mark.ray
def test_a_failed_rerun_never_replaces_a_complete_scan(complete_scan, monkeypatch):
    import raymem.pipeline
    from raymem.errors import ScanFailed
    from raymem.pipeline import run_scan

    raw, out, first = complete_scan
    before = visible(out)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(raymem.pipeline, "label_units", broken)
    with pytest.raises(ScanFailed, match="disk on fire") as raised:
        run_scan(parse_config(raw))
    assert visible(out) == before  # counts, timings, table list: all still the complete attempt's
    attempts = [json.loads(p.read_text()) for p in (out / "_attempts" / first.scan_id).glob("*.json")]
    failed = [a for a in attempts if a["status"] == "failed"]
    assert failed and "disk on fire" in failed[-1]["error"]  # the failure is recorded in the history
    # One line for the console, naming where the whole traceback is; the record holds it, uncoloured.
    message = str(raised.value)
    assert "\n" not in message and message.endswith(
        f"(traceback in {out / '_attempts' / first.scan_id}/{failed[-1]['attempt']}.json)"
    )
    trace = failed[-1]["traceback"]
    assert trace.startswith("Traceback") and "RuntimeError: disk on fire" in trace and "\x1b[" not in trace


def scan_held_at(raw: dict, tmp_path: Path, step: str):
    """A real `raymem scan` process that stops right after publishing `step` (a table) and waits there
    to be killed; returns the process once it is waiting."""
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump(raw))
    marker = tmp_path / "holding"
    script = f"""
import time
from pathlib import Path
from raymem import outputs
from raymem.cli import main

def hold(self, name):
    if name == {step!r}:
        Path({str(marker)!r}).write_text(name)
        time.sleep(600)

outputs.ScanOutputs._after_write = hold
main(["scan", {str(path)!r}])
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, f"the scan ended before it published {step}"
        time.sleep(0.2)
    return proc


@pytest.mark.ray
def test_a_driver_killed_mid_publish_leaves_no_mixture(demo_root, tmp_path):
    """A real SIGKILL of the driver process (and its local Ray) between two table writes."""
    from tests.conftest import demo_raw_config
    from tests.test_resume import kill_process_tree

    out = tmp_path / "out"
    kill_process_tree(scan_held_at(small_scan(demo_raw_config(demo_root), out), tmp_path, "labels"))
    (manifest,) = [json.loads(p.read_text()) for p in (out / "manifests").glob("*.json")]
    assert manifest["status"] == "running"  # never completed: visible as such
    assert all(committed_files(str(out), t) == [] for t in PUBLISHED_TABLES)  # readers see no table
    assert list((out / "generations").rglob("*.parquet"))  # although some files were written


# -- environmental faults, for real: a read-only and a full filesystem (tmpfs mounts) --------------------
@pytest.fixture
def tmpfs(tmp_path):
    """`mount(size)` -> a fresh small tmpfs (needs root with CAP_SYS_ADMIN, as CI and the dev machines have)."""
    mounted = []

    def mount(size: str):
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def scan_cli(config: dict, tmp_path: Path, **env):
    import os

    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "raymem.cli", "scan", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env={**os.environ, **env},
    )


def test_a_read_only_output_root_is_one_line_before_any_work(demo_raw, tmp_path, tmpfs):
    root = tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    out = scan_cli({**demo_raw, "output": {"uri": str(root / "out")}}, tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"raymem: error: {root / 'out'}: cannot write the scan's outputs: Read-only file system"
    ]


@pytest.mark.ray
def test_a_full_disk_mid_scan_fails_in_one_line_and_the_failure_is_recorded(demo_raw, tmp_path, tmpfs):
    root = tmpfs("160k")  # the running manifest fits; the generated images and unit rows do not
    state = tmp_path / "state"
    raw = small_scan(demo_raw, root / "out")
    out = scan_cli(raw, tmp_path, RAYMEM_STATE_DIR=str(state))
    errors = [line for line in out.stderr.splitlines() if line.startswith("raymem: error:")]
    assert out.returncode == 1 and len(errors) == 1, out.stderr[-3000:]
    assert "failed: OSError: [Errno 28] No space left on device" in errors[0]
    # Recorded as failed: on the root if the record still fitted there, else on the local disk.
    manifests = [json.loads(p.read_text()) for p in (root / "out" / "manifests").glob("*.json")]
    local = [json.loads(p.read_text()) for p in state.glob("failed/*.json")]
    assert [m["status"] for m in manifests] in (["failed"], ["running"])
    assert manifests[0]["status"] == "failed" or [r["status"] for r in local] == ["failed"]
    assert all(committed_files(str(root / "out"), t) == [] for t in PUBLISHED_TABLES)


# -- one live attempt per scan: the lease -------------------------------------------------------------
def test_a_live_lease_refuses_a_second_attempt_and_a_dead_or_stale_one_is_taken_over(tmp_path):
    import os
    import socket

    from raymem.errors import ScanBusy

    cfg = publishing_config(tmp_path / "out")
    first = ScanOutputs(cfg, "nightly-2026-11-28-0123456789")
    first.acquire_lease()
    second = ScanOutputs(cfg, "nightly-2026-11-28-0123456789")
    with pytest.raises(ScanBusy, match=rf"is being computed by attempt {first.attempt} on {socket.gethostname()}"):
        second.acquire_lease()
    lease = Path(first.lease_uri)
    # stale: not renewed within the TTL (a driver on another machine that died)
    lease.write_text(json.dumps({"attempt": "old", "host": "elsewhere", "pid": 1, "renewed_at": 0}))
    second.acquire_lease()
    assert json.loads(lease.read_text())["attempt"] == second.attempt
    first.release_lease()  # not first's any more: left alone
    assert lease.exists()
    second.release_lease()
    assert not lease.exists()
    # dead: a fresh lease whose process on this machine is gone (a killed driver, resumed here)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lease.write_text(
        json.dumps({"attempt": "killed", "host": socket.gethostname(), "pid": gone.pid, "renewed_at": time.time()})
    )
    third = ScanOutputs(cfg, "nightly-2026-11-28-0123456789")
    third.acquire_lease()
    third.release_lease()
    assert os.path.exists(tmp_path / "out" / "_attempts")


@pytest.mark.ray
def test_two_scans_racing_on_one_root_the_second_exits_with_a_clear_message(demo_root, tmp_path):
    """Scan A (a real process, held just before it publishes) and scan B of the same config."""
    from raymem.errors import ScanBusy
    from raymem.pipeline import run_scan
    from tests.conftest import demo_raw_config
    from tests.test_resume import kill_process_tree

    raw = small_scan(demo_raw_config(demo_root), tmp_path / "out")
    proc = scan_held_at(raw, tmp_path, "prompts")  # scan A holds the lease, about to publish
    try:
        start = time.time()
        with pytest.raises(
            ScanBusy, match=r"is being computed by attempt .* \(pid \d+, renewed \d+ s ago\); wait for it"
        ):
            run_scan(parse_config(raw))
        assert time.time() - start < 60  # refused before generating anything
    finally:
        kill_process_tree(proc)


def test_embedding_columns_are_written_plain_and_uncompressed_the_rest_zstd(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from raymem.outputs import parquet_bytes
    from raymem.schema import embedding_array

    table = pa.table({"train_id": ["a", "b"], "clip_embedding": embedding_array(np.eye(2, 4, dtype=np.float32), 4)})
    (tmp_path / "t.parquet").write_bytes(parquet_bytes(table))
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    by_name = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    embedding = by_name["clip_embedding.list.element"]
    assert embedding.compression == "UNCOMPRESSED" and "PLAIN" in embedding.encodings
    assert embedding.dictionary_page_offset is None
    assert by_name["train_id"].compression == "ZSTD"
