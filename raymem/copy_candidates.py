"""Two-stage copy detection, for training sets that ship CLIP embeddings only (LAION and its indexes).

Nobody SSCD-embeds two billion images to run one scan, and CLIP similarity is not copy detection (a
generic look scores as high as a copy). So, as Somepalli et al. and Webster did on LAION:

  1. retrieve: the exact join keeps the top-`k` CLIP neighbours of every generation (cheap, streamed);
  2. fetch: the distinct images among those candidates are fetched by `image_uri` (raymem.fetch: http(s),
     s3://, local paths, WebDataset `shard.tar#member`) and SSCD-embedded, in one Ray Data stage of
     fetch + embed actors; each gets a status, and an image that cannot be fetched is evidence missing
     (counted per unit and shown in its reasons), never a failed scan;
  3. decide: the candidates are re-ranked by SSCD cosine to the generation, and the labeler reads them
     as the SSCD neighbours (`neighbors.via = 'candidates'`): replication score, eidetic k and the tiled
     pixel l2 come from them exactly as from an SSCD join.

The train-train background in SSCD space is measured the same way: a sample of training images is
fetched, and each one's nearest SSCD neighbour among its own CLIP candidates (itself and its exact
duplicates excluded) gives the similarity a generic look reaches.

Candidate embeddings are cached under the output root per copy detector, keyed by the URI's hash and
stored with the content's sha256, so a nightly scan fetches each training image once across nights.
Only successful fetches are cached: a dead link is tried again the next night.

Cost grows with generations x k (distinct URIs), never with the training set.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raymem import runtime
from raymem import uri as uris
from raymem.background import distinct_link, distinct_percentiles
from raymem.config import CandidatesConfig, CopyDetectionConfig, ScanConfig
from raymem.duplicates import attach_pair_scores
from raymem.errors import InputError
from raymem.fetch import Fetcher, FetchLimits, decode_rgb, public_uri
from raymem.outputs import parquet_bytes
from raymem.schema import (
    CANDIDATE_CACHE,
    CANDIDATES,
    FETCH_OUTCOMES,
    SPACE_COLUMNS,
    embedding_array,
    embedding_matrix,
)
from raymem.sources import TrainingTable
from raymem.store import newest_rows

log = logging.getLogger(__name__)

# How a scan gets its copy-detection neighbours.
MODE_JOIN = "join"  # the training table has sscd_embedding: exact join in SSCD space
MODE_CANDIDATES = "candidates"  # CLIP top-k candidates fetched and SSCD-embedded (this module)
MODE_OFF = "off"  # no copy detector configured: replication only in CLIP space, if calibrated

EMBED_CHUNK = 64  # images per copy-detector call


def copy_detection_mode(cfg: ScanConfig, training: TrainingTable) -> str:
    """How this scan detects copies; bad input when it cannot (checked before anything runs)."""
    if not cfg.embedding.copy_detection.model:
        return MODE_OFF
    if SPACE_COLUMNS["sscd"] in training.columns:
        return MODE_JOIN
    if "image_uri" in training.columns:
        return MODE_CANDIDATES
    raise InputError(
        training.files[0] if training.files else training.uri,
        "copy detection is on but the training table has neither sscd_embedding nor image_uri, so copies "
        "cannot be detected: add SSCD embeddings (raymem index) or image URIs (two-stage copy detection), "
        "or set embedding.copy_detection.model: null",
        field="sscd_embedding",
    )


def uri_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def read_cache(root: str, keys: set[str]) -> dict[str, tuple[str, np.ndarray]]:
    """{uri_key: (content sha256, embedding)} for the wanted keys that earlier scans cached (the newest
    entry of a key when several scans fetched it)."""
    if not keys or not uris.exists(root):
        return {}
    table = newest_rows(root, "uri_key", keys)
    if table is None:
        return {}
    matrix = embedding_matrix(table.column("sscd_embedding"))
    pairs = zip(table.column("uri_key").to_pylist(), table.column("content_sha256").to_pylist())
    return {key: (sha, matrix[i]) for i, (key, sha) in enumerate(pairs)}


class FetchEmbed:
    """Ray Data callable class: (uri_key, uri) rows in; each URI fetched, checked, SSCD-embedded, and the
    successes appended to the candidate cache (one file per call, written atomically)."""

    def __init__(self, copy_detection: CopyDetectionConfig, cache_uri: str | None, cpus: float = 1.0):
        from raymem.encoders import CopyDetector
        from raymem.generate import pick_device

        c = copy_detection.candidates
        self.detector = CopyDetector(copy_detection, pick_device(), threads=max(1, int(cpus)))
        self.fetcher = Fetcher(FetchLimits.of(c), threads=c.threads)
        self.cache_uri = cache_uri
        self.schema = FETCH_OUTCOMES(self.detector.dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("uri_key").to_pylist()
        fetched = self.fetcher.fetch_many(batch.column("uri").to_pylist())
        ok = [i for i, f in enumerate(fetched) if f.status == "ok"]
        dim = self.detector.dim
        matrix = np.zeros((len(keys), dim), np.float32)
        for start in range(0, len(ok), EMBED_CHUNK):
            rows = ok[start : start + EMBED_CHUNK]
            matrix[rows] = self.detector.encode_images([decode_rgb(fetched[i].data) for i in rows])
        shas = [f.sha256 for f in fetched]
        valid = np.zeros(len(keys), bool)
        valid[ok] = True
        if self.cache_uri and ok:
            now = dt.datetime.now(dt.UTC)
            cached = pa.table(
                {
                    "uri_key": pa.array([keys[i] for i in ok], pa.string()),
                    "content_sha256": pa.array([shas[i] for i in ok], pa.string()),
                    "sscd_embedding": embedding_array(matrix[ok], dim),
                    "computed_at": pa.array([now] * len(ok), pa.timestamp("us", tz="UTC")),
                },
                schema=CANDIDATE_CACHE(dim),
            )
            name = f"part-{int(time.time() * 1e3)}-{os.getpid()}-{uuid.uuid4().hex[:6]}.parquet"
            uris.write_bytes_atomic(uris.join(self.cache_uri, name), parquet_bytes(cached))
        return pa.table(
            {
                "uri_key": pa.array(keys, pa.string()),
                "status": pa.array([f.status for f in fetched], pa.string()),
                "error": pa.array([f.error for f in fetched], pa.string()),
                "http_status": pa.array([f.http_status for f in fetched], pa.int32()),
                "content_sha256": pa.array(shas, pa.string()),
                "attempts": pa.array([f.attempts for f in fetched], pa.int32()),
                "seconds": pa.array([f.seconds for f in fetched], pa.float32()),
                "sscd_embedding": embedding_array(matrix, dim, valid),
            },
            schema=self.schema,
        )


@dataclass
class Outcome:
    status: str
    error: str | None = None
    http_status: int | None = None
    content_sha256: str | None = None
    embedding: np.ndarray | None = None
    cached: bool = False


@dataclass
class CandidateQueries:
    """One query set's CLIP candidates: `rows[i]` are query i's neighbours by CLIP rank (train_id, score,
    image_uri, caption, entities, image_hash); `own_uris` (background only) are the queries' own images."""

    ids: list[str]
    rows: list[list[dict]]
    embeddings: np.ndarray | None = None  # (n, d) SSCD of the queries (the scan's generations)
    own_uris: list[str | None] | None = None
    own_hashes: list[str | None] | None = None


@dataclass
class CandidateResult:
    neighbors: dict[str, list[dict]]  # unit_id -> SSCD-ranked candidates (the top `keep`)
    table: pa.Table  # the published `candidates` table
    background: dict | None  # SSCD train-train background percentiles, when measured
    stats: dict = field(default_factory=dict)


def resolve(
    cfg: ScanConfig, cache_uri: str | None, uris_: set[str], plan: runtime.StagePlan
) -> tuple[dict[str, Outcome], dict]:
    """An outcome for every URI: from the cache (when `candidates.cache`), else fetched and embedded by
    the FetchEmbed stage."""
    c = cfg.embedding.copy_detection.candidates
    cache_uri = cache_uri if c.cache else None
    keys = {uri_key(u): u for u in uris_}
    cached = read_cache(cache_uri, set(keys)) if cache_uri else {}
    outcomes = {keys[k]: Outcome("ok", content_sha256=sha, embedding=e, cached=True) for k, (sha, e) in cached.items()}
    todo = [{"uri_key": k, "uri": u} for k, u in sorted(keys.items()) if k not in cached]
    log.info("copy candidates: %d distinct images, %d cached, %d to fetch", len(keys), len(cached), len(todo))
    start = time.perf_counter()
    if todo:
        batches = runtime.map_stage(
            "fetch_candidates",
            todo,
            FetchEmbed,
            plan,
            constructor_kwargs={
                "copy_detection": cfg.embedding.copy_detection,
                "cache_uri": cache_uri,
                "cpus": plan.num_cpus,
            },
            batch_size=c.batch_size,
            blocks=max(1, -(-len(todo) // c.batch_size)),
        )
        progress = runtime.Progress("fetch_candidates", len(todo), "images")
        for batch in batches:
            progress.advance(batch.num_rows)
            column = batch.column("sscd_embedding")
            valid = column.is_valid().to_numpy(zero_copy_only=False)
            matrix = embedding_matrix(column.filter(pa.array(valid))) if valid.any() else None
            row_of = np.cumsum(valid) - 1
            for i, r in enumerate(batch.drop_columns(["sscd_embedding"]).to_pylist()):
                emb = matrix[row_of[i]] if valid[i] else None
                outcomes[keys[r["uri_key"]]] = Outcome(
                    r["status"], r["error"], r["http_status"], r["content_sha256"], emb
                )
        progress.finish()
    seconds = time.perf_counter() - start
    statuses = Counter(o.status for o in outcomes.values())
    stats = {
        "distinct_images": len(keys),
        "cached": len(cached),
        "fetched": len(todo),
        "fetch_seconds": round(seconds, 3),
        "fetched_per_second": round(len(todo) / seconds, 2) if todo and seconds > 0 else None,
        "status": dict(sorted(statuses.items())),
    }
    return outcomes, stats


def rescore(
    cfg: ScanConfig,
    scan_id: str,
    units: CandidateQueries,
    background: CandidateQueries | None,
    plan: runtime.StagePlan,
    cache_uri: str | None,
) -> CandidateResult:
    """Stages 2 and 3: fetch + embed every candidate (and the background sample), re-rank by SSCD."""
    wanted = {r["image_uri"] for rows in units.rows for r in rows if r.get("image_uri")}
    if background is not None:
        wanted |= {r["image_uri"] for rows in background.rows for r in rows if r.get("image_uri")}
        wanted |= {u for u in background.own_uris or () if u}
    outcomes, stats = resolve(cfg, cache_uri, wanted, plan)
    keep = cfg.join.k

    neighbors: dict[str, list[dict]] = {}
    table_rows = []
    for qi, unit_id in enumerate(units.ids):
        query = units.embeddings[qi]
        scored = []
        for rank, r in enumerate(units.rows[qi], start=1):
            outcome = _outcome(outcomes, r.get("image_uri"))
            score = float(outcome.embedding @ query) if outcome.embedding is not None else None
            table_rows.append(_table_row(scan_id, "units", unit_id, rank, r, outcome, score))
            if score is not None:
                scored.append({**r, "score": score})
        scored.sort(key=lambda n: (-n["score"], str(n["train_id"])))
        neighbors[unit_id] = scored[:keep]
    # near-duplicate structure among the kept neighbours (raymem.duplicates), from the fetched embeddings
    attach_pair_scores(
        [neighbors[u] for u in units.ids],
        cfg.thresholds.replication,
        lambda r: _outcome(outcomes, r.get("image_uri")).embedding,
    )
    measured = None
    if background is not None:
        per_image, background_rows = _background_scores(scan_id, background, outcomes)
        table_rows += background_rows
        # each sampled image's nearest distinct candidate, near-duplicates passed over (raymem.background)
        t = cfg.thresholds
        measured = distinct_percentiles(padded(per_image), distinct_link("sscd", t), t.eidetic_k) if per_image else None
        stats["background_sample"] = measured["n"] if measured else 0
    table = pa.Table.from_pylist(table_rows, schema=CANDIDATES) if table_rows else CANDIDATES.empty_table()
    return CandidateResult(neighbors, table, measured, stats)


def _outcome(outcomes: dict[str, Outcome], uri: str | None) -> Outcome:
    if not uri:
        return Outcome("no_uri", "the training row has no image_uri")
    return outcomes[uri]


def _table_row(scan_id, query_set, query_id, rank, r, outcome: Outcome, score) -> dict:
    return {
        "scan_id": scan_id,
        "query_set": query_set,
        "query_id": query_id,
        "clip_rank": rank,
        "clip_score": r["score"],
        "train_id": r["train_id"],
        "image_uri": public_uri(r.get("image_uri")),
        "status": outcome.status,
        "error": outcome.error,
        "http_status": outcome.http_status,
        "content_sha256": outcome.content_sha256,
        "cached": outcome.cached,
        "sscd_score": score,
    }


def padded(per_image: list[list[float]]) -> np.ndarray:
    """Score lists as one matrix, each row best first, -inf where a list is shorter."""
    out = np.full((len(per_image), max(len(s) for s in per_image)), -np.inf)
    for i, scores in enumerate(per_image):
        out[i, : len(scores)] = sorted(scores, reverse=True)
    return out


def _background_scores(scan_id: str, bg: CandidateQueries, outcomes: dict[str, Outcome]):
    """Each sampled training image's SSCD scores to its CLIP candidates (images with at least one), itself
    and its exact duplicates (same train_id, image_hash or content) excluded."""
    per_image, rows = [], []
    own_uris = bg.own_uris or [None] * len(bg.ids)
    own_hashes = bg.own_hashes or [None] * len(bg.ids)
    for qi, train_id in enumerate(bg.ids):
        own = _outcome(outcomes, own_uris[qi])
        own_hash = own_hashes[qi]
        scores = []
        for rank, r in enumerate(bg.rows[qi], start=1):
            outcome = _outcome(outcomes, r.get("image_uri"))
            same = (
                r["train_id"] == train_id
                or (own_hash and r.get("image_hash") == own_hash)
                or (own.content_sha256 and outcome.content_sha256 == own.content_sha256)
            )
            score = None
            if own.embedding is not None and outcome.embedding is not None and not same:
                score = float(outcome.embedding @ own.embedding)
                scores.append(score)
            rows.append(_table_row(scan_id, "background", train_id, rank, r, outcome, score))
        if scores:
            per_image.append(scores)
    return per_image, rows


__all__ = [
    "CandidatesConfig",
    "CandidateQueries",
    "CandidateResult",
    "FetchEmbed",
    "MODE_CANDIDATES",
    "MODE_JOIN",
    "MODE_OFF",
    "copy_detection_mode",
    "read_cache",
    "rescore",
]
