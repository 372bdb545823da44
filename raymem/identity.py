"""What a scan is, by content: its id covers the prompt set, the training table, the model and the
settings -- never where they sit on disk.

    scan id = <name>-<scan_date>-<first 10 hex of sha256(identity)>

The identity is the settings (the config without its paths, resources, Ray and output location) plus
fingerprints of what the paths point to: the prompt rows as parsed, the training table's file list and
footers (names relative to its root, row-group sizes, a digest of each Parquet footer, columns,
dimensions), the diffusion model's weights and configs, and any local CLIP or copy-detection checkpoint.
The same config run from another directory is the same scan; a prompt file whose contents changed is
another scan, and so is a training file rewritten with other tags, captions or ids (their statistics and
sizes are in the footer). Not seen, since no data is read: a float edited in place in an embedding column
(no statistics) that leaves the compressed size the same.
"""

from __future__ import annotations

import hashlib
import json
import os

from raymem import uri as uris
from raymem.config import ModelConfig, ScanConfig

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack")
HEAD = 1 << 20  # bytes hashed at each end of a large weight file


def _file_digest(h, path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if path.endswith(_WEIGHT_SUFFIXES) and size > 2 * HEAD:
            h.update(str(size).encode())
            h.update(f.read(HEAD))
            f.seek(-HEAD, os.SEEK_END)
        h.update(f.read())


def tree_fingerprint(path: str) -> str:
    """A local file or directory by content: every file's relative name and bytes (weight files larger
    than 2 MiB by size and their first and last MiB: a full hash of multi-GB weights costs more than it
    buys)."""
    h = hashlib.sha256()
    _update_tree(h, path)
    return h.hexdigest()


def _update_tree(h, path: str) -> None:
    if os.path.isfile(path):
        _file_digest(h, path)
        return
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            h.update(os.path.relpath(full, path).encode())
            _file_digest(h, full)


def model_fingerprint(cfg: ModelConfig) -> str:
    """Identifies the weights a unit was generated with, cheaply: a local directory by content, a hub id
    or s3:// prefix by id and revision."""
    h = hashlib.sha256()
    if uris.is_remote(cfg.id) or not os.path.isdir(cfg.id):
        h.update(f"{cfg.id}@{cfg.revision or 'main'}:{cfg.variant}".encode())
        return h.hexdigest()
    _update_tree(h, cfg.id)  # the same bytes as before the id moved here: unit ids stay stable
    h.update(f"variant={cfg.variant}".encode())
    return h.hexdigest()


def _reference(value: str | None) -> str | None:
    """A model/checkpoint reference by content when it is local, else as written (hub names, tags)."""
    if not value:
        return value
    local = value.removeprefix("local-dir:")
    if local.startswith("/") and os.path.exists(local):
        return f"sha256:{tree_fingerprint(local)}"
    return value


def training_fingerprint(training) -> dict:
    """The training table by its footers: layout, files relative to its root, rows per row group, a
    digest of each Parquet footer (column chunk sizes, offsets, statistics), columns and dimensions
    (reading no data)."""
    base = training.uri.rstrip("/")

    def rel(path: str) -> str:
        return path[len(base) + 1 :] if path.startswith(base + "/") else path.rsplit("/", 1)[-1]

    return {
        "layout": training.layout,
        # with each file's footer digest where the layout has one: the same names and row counts with
        # other contents (re-written tags, re-computed embeddings) are another scan
        "files": [
            [rel(f), groups, *([footer] if footer else [])]
            for f, groups, footer in zip(
                training.files, training.row_groups, training.footers or [None] * len(training.files)
            )
        ],
        "embedding_files": [rel(f) for f in training.embedding_files],
        "columns": sorted(training.columns),
        "dims": training.dims,
    }


def prompts_fingerprint(prompts) -> str:
    rows = [
        [p.prompt_id, p.prompt, p.entity, p.entity_class, list(p.explicit_elements), list(p.implicit_elements)]
        + (["requests_work"] if p.requests_work else [])  # only when set: earlier scan ids stay the same
        for p in prompts
    ]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


OPERATIONAL_FETCH_SETTINGS = (
    "timeout_s",
    "retries",
    "backoff_s",
    "per_host",
    "threads",
    "actors",
    "batch_size",
    "cache",
)


def scan_identity(cfg: ScanConfig, prompts, training) -> dict:
    settings = cfg.model_dump(
        mode="json",
        exclude={
            "ray": True,
            "resources": True,
            "output": True,
            "prompts": True,
            "training": True,
            "model": {"id", "offload"},  # offloading moves weights, not results
            # how candidates are fetched is operations, like `resources`; what is fetched (k, limits) is not
            "embedding": {"copy_detection": {"candidates": set(OPERATIONAL_FETCH_SETTINGS)}},
        },
    )
    embedding = settings["embedding"]
    embedding["clip"]["model"] = _reference(embedding["clip"]["model"])
    embedding["clip"]["pretrained"] = _reference(embedding["clip"]["pretrained"])
    embedding["copy_detection"]["model"] = _reference(embedding["copy_detection"]["model"])
    return {
        "settings": settings,
        "model": model_fingerprint(cfg.model),
        "prompts": prompts_fingerprint(prompts),
        "training": training_fingerprint(training),
    }


def scan_id_of(cfg: ScanConfig, identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    return f"{cfg.name}-{cfg.scan_date.isoformat()}-{digest.hexdigest()[:10]}"


# What must be the same on both sides of the join for its scores to mean anything, per embedding space
# of the training table: dotted fields of the embedding config.
_EMBEDDED_WITH = {
    "clip": ("clip.model", "clip.pretrained"),
    "sscd": ("copy_detection.model", "copy_detection.image_size"),
}


def _what_it_is(value) -> tuple[str, object]:
    """('content', digest) for a local file or directory, ('unknown', value) for a remote or missing path
    (its bytes are not read here), ('name', value) for a hub name, an open_clip tag, a size."""
    if value is None or not isinstance(value, str):
        return "name", value
    ref = _reference(value)
    if ref != value:
        return "content", ref
    local = value.removeprefix("local-dir:")
    if uris.is_remote(value) or local.startswith(("/", "./", "../", "~")) or os.path.sep in local:
        return "unknown", value
    return "name", value


def embedding_mismatches(index_manifest: dict | None, embedding: dict, spaces) -> tuple[list, list]:
    """Compare the embedding settings `raymem index` recorded (`_index.json`) with the scan's, for the
    spaces the training table has: (fields that provably differ, fields that differ in how they are
    written and cannot be compared here: a local directory against an s3:// copy), each as
    (field, index value, scan value). Scores between embeddings of two models or two input sizes are
    not comparable, and nothing downstream could tell (same dimension, plausible numbers)."""
    recorded = ((index_manifest or {}).get("config") or {}).get("embedding")
    if not recorded:
        return [], []  # not written by `raymem index` (or before it recorded its embedding)
    differ, unverifiable = [], []
    for space in spaces:
        for field in _EMBEDDED_WITH.get(space, ()):
            section, key = field.split(".")
            was, now = (recorded.get(section) or {}).get(key), (embedding.get(section) or {}).get(key)
            if was == now:
                continue
            (kind_was, ref_was), (kind_now, ref_now) = _what_it_is(was), _what_it_is(now)
            if ref_was == ref_now:
                continue
            if "unknown" in (kind_was, kind_now):
                unverifiable.append((field, was, now))
            else:
                differ.append((field, was, now))
    return differ, unverifiable
