"""`raymem index`: embed a training set into raymem's training-embeddings Parquet, on Ray.

Inputs: a folder of images (captions from same-name .txt files), a Parquet/JSONL/CSV table of image
paths or URIs with captions, or a WebDataset (.tar shards of key.jpg/png/webp + key.txt/json).
Output, under `output`:

    part-NNNNN.parquet     train_id, clip_embedding, sscd_embedding (when configured), caption,
                           image_uri, entities (entity names found in the caption)
    _errors/part-NNNNN.parquet   images that could not be read or embedded (train_id, image_uri, error)
    _faiss/part-NNNNN.<space>.faiss   IVF indexes (with --faiss)
    _index.json            config, counts, shards, train-train background, FAISS recall

Work is sharded (`shard_size` images, or one tar per shard); each shard is written atomically by the
actor that embedded it, so a re-run skips finished shards and a crash loses only shards in flight.
A corrupt or unreadable image is recorded in `_errors/`, never fatal.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import os
import posixpath
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from raymem import runtime
from raymem import uri as uris
from raymem.captions import tag_entities
from raymem.config import ActorRange, FaissConfig, IndexConfig, ThresholdsConfig
from raymem.errors import InputError
from raymem.outputs import redacted
from raymem.schema import stored_embedding_array

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ERRORS_SCHEMA = pa.schema([("train_id", pa.string()), ("image_uri", pa.string()), ("error", pa.string())])


def load_entities(spec: list[str] | str | None) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, list):
        return [e.strip() for e in spec if e.strip()]
    try:
        text = uris.read_bytes(spec).decode("utf-8")
    except FileNotFoundError:
        raise InputError(spec, "entity list not found") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}"


# -- planning shards ---------------------------------------------------------------------------------


def plan_shards(cfg: IndexConfig) -> list[dict]:
    """Shard descriptors: {"shard": i, "items": json [[train_id, image_uri, caption|None, caption_uri|None]]}
    or {"shard": i, "tar": uri} for WebDataset input."""
    inp = cfg.input
    if inp.kind == "webdataset":
        tars = uris.list_files(inp.path, ".tar")
        if not tars:
            raise InputError(inp.path, "no .tar shards found")
        return [{"shard": i, "tar": t, "items": ""} for i, t in enumerate(tars)]
    items = _folder_items(inp.path) if inp.kind == "folder" else _table_items(cfg)
    if not items:
        raise InputError(inp.path, "no images found")
    return [
        {"shard": i, "tar": "", "items": json.dumps(items[start : start + cfg.shard_size])}
        for i, start in enumerate(range(0, len(items), cfg.shard_size))
    ]


def _folder_items(root: str) -> list[list]:
    files = uris.list_files(root)
    if not files and not uris.exists(root):
        raise InputError(root, "input folder not found")
    texts = {f[: -len(".txt")] for f in files if f.endswith(".txt")}
    base = root.rstrip("/")
    items = []
    for f in files:
        stem, suffix = os.path.splitext(f)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = f[len(base) + 1 :] if f.startswith(base + "/") else os.path.basename(f)
        train_id = os.path.splitext(rel)[0]
        items.append([train_id, f, None, stem + ".txt" if stem in texts else None])
    return items


def _table_items(cfg: IndexConfig) -> list[list]:
    from raymem.prompts import read_records

    inp = cfg.input
    try:
        data = uris.read_bytes(inp.path)
    except FileNotFoundError:
        raise InputError(inp.path, "input table not found") from None
    columns, records = read_records(inp.path, data)
    for name in (inp.image_column, inp.caption_column, inp.id_column):
        if name and name not in columns:
            raise InputError(inp.path, "required column is missing", field=name)
    base = posixpath.dirname(inp.path) if uris.is_remote(inp.path) else str(Path(inp.path).parent)
    items, seen = [], {}
    for number, r in records:
        image = r.get(inp.image_column)
        if not isinstance(image, str) or not image.strip():
            raise InputError(inp.path, "expected an image path or URI", row=number, field=inp.image_column)
        uri = image if uris.is_remote(image) or os.path.isabs(image) else uris.join(base, image)
        train_id = str(r.get(inp.id_column)) if inp.id_column else image
        if train_id in seen:
            raise InputError(
                inp.path,
                f"duplicate id '{train_id}' (first at row {seen[train_id]})",
                row=number,
                field=inp.id_column or inp.image_column,
            )
        seen[train_id] = number
        caption = r.get(inp.caption_column)
        items.append([train_id, uri, caption if isinstance(caption, str) else None, None])
    return items


# -- the embedding actor -----------------------------------------------------------------------------


def _tar_samples(tar_uri: str):
    """(key, image member name, image bytes, caption) per WebDataset sample, streamed from the tar."""
    fs, path = uris.filesystem(tar_uri)
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        current, image, caption = None, None, None
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            key, ext = os.path.splitext(name)
            if key != current:
                if current is not None:
                    yield current, image, caption
                current, image, caption = key, None, None
            data = tar.extractfile(member).read()
            ext = ext.lower()
            if ext in IMAGE_SUFFIXES:
                image = (name, data)
            elif ext == ".txt":
                caption = data.decode("utf-8", "replace").strip()
            elif ext == ".json" and caption is None:
                try:
                    caption = json.loads(data).get("caption")
                except (ValueError, AttributeError):
                    pass
        if current is not None:
            yield current, image, caption


def _decode(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def image_hash(image) -> str:
    """Content hash of the decoded pixels: exact duplicates share it, whatever their file names."""
    import hashlib

    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()[:20]


class IndexEmbed:
    """Ray Data callable class: shard descriptors in, one summary row per shard out."""

    def __init__(self, cfg: IndexConfig, entities: list[str]):
        import torch

        from raymem.encoders import ClipEncoder, CopyDetector
        from raymem.generate import pick_device

        self.cfg, self.entities = cfg, entities
        self.device = pick_device()
        threads = max(1, int(cfg.resources.cpus_per_actor))
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.clip = ClipEncoder(cfg.embedding.clip, self.device)
        cd = cfg.embedding.copy_detection
        self.sscd = CopyDetector(cd, self.device, threads=threads) if cd.model else None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, threads * 2))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            start = time.perf_counter()
            samples = self._samples(row)
            ok, errors = self._embed(samples)
            self._write(row["shard"], ok, errors)
            out.append(
                {
                    "shard": row["shard"],
                    "rows": len(ok["train_id"]),
                    "errors": len(errors),
                    "seconds": time.perf_counter() - start,
                }
            )
        return pa.Table.from_pylist(out)

    def _samples(self, row: dict):
        """(train_id, image_uri, caption, loader) per image; the loader runs in a thread."""
        if row["tar"]:
            tar_name = posixpath.basename(row["tar"])[: -len(".tar")]
            for key, image, caption in _tar_samples(row["tar"]):
                train_id = f"{tar_name}/{key}"
                if image is None:
                    yield train_id, None, caption, None
                    continue
                name, data = image
                yield train_id, f"{row['tar']}#{name}", caption, (lambda d=data: _decode(d))
            return
        for train_id, uri, caption, caption_uri in json.loads(row["items"]):
            if caption is None and caption_uri:
                try:
                    caption = uris.read_bytes(caption_uri).decode("utf-8", "replace").strip()
                except OSError:
                    caption = None
            yield train_id, uri, caption, (lambda u=uri: _decode(uris.read_bytes(u)))

    def _embed(self, samples):
        ok = {"train_id": [], "image_uri": [], "caption": [], "clip": [], "sscd": [], "hash": []}
        errors: list[dict] = []
        batch = []
        for train_id, uri, caption, loader in samples:
            if loader is None:
                errors.append({"train_id": train_id, "image_uri": uri, "error": "no image in the sample"})
                continue
            batch.append((train_id, uri, caption, self.pool.submit(loader)))  # decode ahead, in threads
            if len(batch) >= self.cfg.batch_size:
                self._embed_batch(batch, ok, errors)
                batch = []
        self._embed_batch(batch, ok, errors)
        return ok, errors

    def _embed_batch(self, batch, ok: dict, errors: list[dict]) -> None:
        images = []
        for train_id, uri, caption, future in batch:
            try:
                images.append((train_id, uri, caption, future.result()))
            except Exception as err:  # noqa: BLE001 - a bad image is recorded, the shard goes on
                errors.append({"train_id": train_id, "image_uri": uri, "error": f"{type(err).__name__}: {err}"})
        self._encode(images, ok, errors)

    def _encode(self, images, ok: dict, errors: list[dict]) -> None:
        if not images:
            return
        pics = [im for *_, im in images]
        try:
            clip = self.clip.encode_images(pics)
            sscd = self.sscd.encode_images(pics) if self.sscd else None
        except Exception as err:  # noqa: BLE001
            if len(images) == 1:
                train_id, uri, *_ = images[0]
                errors.append({"train_id": train_id, "image_uri": uri, "error": f"{type(err).__name__}: {err}"})
                return
            for item in images:  # isolate the image that broke the batch
                self._encode([item], ok, errors)
            return
        for i, (train_id, uri, caption, _) in enumerate(images):
            ok["train_id"].append(train_id)
            ok["image_uri"].append(uri)
            ok["caption"].append(caption)
            ok["hash"].append(image_hash(images[i][3]))
            ok["clip"].append(clip[i])
            if sscd is not None:
                ok["sscd"].append(sscd[i])

    def _write(self, shard: int, ok: dict, errors: list[dict]) -> None:
        from raymem.outputs import parquet_bytes

        cols = {
            "train_id": pa.array(ok["train_id"], pa.string()),
            "clip_embedding": stored_embedding_array(np.array(ok["clip"]), self.clip.dim, self.cfg.embedding_storage),
        }
        if self.sscd is not None:
            cols["sscd_embedding"] = stored_embedding_array(
                np.array(ok["sscd"]), self.sscd.dim, self.cfg.embedding_storage
            )
        cols["caption"] = pa.array(ok["caption"], pa.string())
        cols["image_uri"] = pa.array(ok["image_uri"], pa.string())
        cols["entities"] = pa.array([tag_entities(c, self.entities) for c in ok["caption"]], pa.list_(pa.string()))
        cols["image_hash"] = pa.array(ok["hash"], pa.string())
        name = shard_name(shard)
        # Errors first: the shard file is the completion marker, so it goes last.
        if errors:
            table = pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)
            uris.write_bytes_atomic(uris.join(self.cfg.output, "_errors", f"{name}.parquet"), parquet_bytes(table))
        uris.write_bytes_atomic(uris.join(self.cfg.output, f"{name}.parquet"), parquet_bytes(pa.table(cols)))


# -- driver ------------------------------------------------------------------------------------------


def run_index(cfg: IndexConfig) -> dict:
    entities = load_entities(cfg.entities)
    shards = plan_shards(cfg)  # bad input fails here, before Ray starts
    with runtime.ray_session(cfg.ray):
        return _index(cfg, shards, entities)


def _index(cfg: IndexConfig, shards: list[dict], entities: list[str]) -> dict:
    from raymem.background import NEIGHBOURS, background_from, background_sample
    from raymem.join import nearest_neighbours
    from raymem.sources import inspect_training

    done = {s for s in range(len(shards)) if uris.exists(uris.join(cfg.output, f"{shard_name(s)}.parquet"))}
    todo = [s for s in shards if s["shard"] not in done]
    log.info("%d shards: %d already done, %d to embed", len(shards), len(done), len(todo))
    summaries = []
    t0 = time.perf_counter()
    if todo:
        r = cfg.resources
        plan = runtime.plan_actors(
            ActorRange(r.actors, r.actors) if r.actors else None,
            r.gpus_per_actor,
            r.cpus_per_actor,
            runtime.ClusterResources.current(),
        )
        results = runtime.map_stage(
            "index", todo, IndexEmbed, plan, constructor_kwargs={"cfg": cfg, "entities": entities}
        )
        summaries = [row for batch in results for row in batch.to_pylist()]
    embed_seconds = time.perf_counter() - t0
    training = inspect_training(cfg.output, {})
    manifest = {
        "config": redacted(cfg.model_dump(mode="json")),
        "rows": training.num_rows,
        "shards": len(shards),
        "shards_embedded_now": len(todo),
        "errors": _count_errors(cfg.output),
        "dims": training.dims,
        "embed_seconds": round(embed_seconds, 3),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cfg.background_sample:
        bg = background_sample(training, cfg.background_sample, list(training.dims))
        if bg is not None:
            # with the default thresholds; a scan with other near-duplicate settings measures its own
            result = nearest_neighbours(training, {"background": bg}, NEIGHBOURS, batch_rows=None)
            manifest["background"] = background_from(result["background"], ThresholdsConfig())
    if cfg.faiss.enabled:
        from raymem.faiss_index import build_indexes

        manifest["faiss"] = build_indexes(training, cfg.faiss)
        manifest["faiss"]["recall"] = measure_recall(training, cfg.faiss)
    uris.write_bytes_atomic(uris.join(cfg.output, "_index.json"), json.dumps(manifest, indent=2).encode())
    manifest["shard_summaries"] = summaries
    return manifest


def _count_errors(output: str) -> int:
    import pyarrow.parquet as pq

    total = 0
    for path in uris.list_files(uris.join(output, "_errors"), ".parquet"):
        fs, p = uris.filesystem(path)
        total += pq.read_metadata(p, filesystem=fs).num_rows
    return total


def measure_recall(training, cfg: FaissConfig) -> dict:
    """recall@k of the IVF mode against the exact join, on sampled training rows as queries."""
    from raymem.background import background_sample
    from raymem.candidates import Queries
    from raymem.join import nearest_neighbours

    sample = background_sample(training, cfg.recall_queries, list(training.dims))
    if sample is None:
        return {}
    queries = {"recall": Queries(sample.ids, sample.matrices)}
    t0 = time.perf_counter()
    exact = nearest_neighbours(training, queries, cfg.recall_k, batch_rows=None)
    t1 = time.perf_counter()
    approx = nearest_neighbours(training, queries, cfg.recall_k, batch_rows=None, mode="faiss", nprobe=cfg.nprobe)
    t2 = time.perf_counter()
    out = {
        "k": cfg.recall_k,
        "nprobe": cfg.nprobe,
        "queries": len(sample.ids),
        "exact_seconds": round(t1 - t0, 3),
        "faiss_seconds": round(t2 - t1, 3),
    }
    for space in exact["recall"]:
        e, a = exact["recall"][space].ids, approx["recall"][space].ids
        hits = [len(set(e[i]) & set(a[i]) - {None}) / max(1, len(set(e[i]) - {None})) for i in range(len(e))]
        out[f"recall_{space}"] = float(np.mean(hits))
    return out
