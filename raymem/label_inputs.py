"""Everything the labeler decides on, rebuilt from a scan's published tables.

The scan stages its tables, builds `LabelInputs` from those very tables and labels; `raymem calibrate`
reads the same tables back and builds the same `LabelInputs`. One builder for both paths means a
re-decision at the scan's own thresholds reproduces every stored label, flag and reason exactly.

Embeddings stay (n, d) float32 matrices aligned with the generations table; nothing is turned into
per-row Python lists.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymem.mining import Association, EntityAssociations
from raymem.pixels import PixelEvidence
from raymem.probes import Probe
from raymem.regions import RegionEvidence, region_evidence
from raymem.schema import PUBLISHED_TABLES, ROLE_SCAN, SPACE_COLUMNS, STATUS_OK, embedding_matrix

# The labeler's output tables; every other published table is its input.
OUTPUT_TABLES = ("labels", "prompt_tallies", "entity_tallies")
INPUT_TABLES = tuple(t for t in PUBLISHED_TABLES if t not in OUTPUT_TABLES)
assert set(OUTPUT_TABLES) <= set(PUBLISHED_TABLES)


@dataclass(frozen=True)
class Background:
    """Train-train nearest-neighbour similarity (DCR's background) in one embedding space."""

    space: str
    p95: float
    n: int


@dataclass(frozen=True)
class EntityStats:
    """What the training set says about an entity: how many images carry its tag, and their mean CLIP
    embedding (the reference the labeler measures "is the entity rendered?" against)."""

    count: int
    centroid: np.ndarray | None
    # a requested work's own training images, (train_id, image_uri): a sample drawn by train_id hash,
    # whatever the scan images look like (`signals.work_copies`; empty for other entities)
    work_copies: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class PromptContext:
    """What the labeler knows about a prompt besides its images."""

    prompt_id: str
    prompt: str
    entity: str
    entity_class: str
    probes: tuple[Probe, ...]
    associations: EntityAssociations | None = None
    reference: EntityStats | None = None  # the entity's training images (count, CLIP centroid)
    requests_work: bool = False  # the prompt asks for this specific work (a copy of it is expected)


@dataclass
class LabelInputs:
    """The labeler's inputs for one scan: generation rows with their embedding matrices, per-prompt
    context, probe-text embeddings, neighbours, the background and pixel checks."""

    generations: list[dict]  # generations rows without embeddings; row i <-> clip[i], sscd[i]
    clip: np.ndarray  # (n, d); zero rows for failed units
    sscd: np.ndarray | None  # (n, d) when the scan embedded with a copy detector
    contexts: dict[str, PromptContext]
    texts: dict[str, np.ndarray]
    neighbors: dict[str, dict[str, list[dict]]]  # unit_id -> space -> rows by rank
    background: dict[str, Background]
    pixels: dict[str, PixelEvidence]
    # Two-stage copy detection (training table without SSCD): unit_id -> (CLIP candidates not fetched,
    # CLIP candidates). Empty when the SSCD neighbours came from a join.
    missing: dict[str, tuple[int, int]] = field(default_factory=dict)
    two_stage: bool = False
    # Region-level copy detection: unit_id -> one comparison per neighbouring training image; and the
    # same for sampled training images against their own neighbours (train_id -> comparisons).
    regions: dict[str, list[RegionEvidence]] = field(default_factory=dict)
    region_background: dict[str, list[RegionEvidence]] = field(default_factory=dict)
    # Sampled training images against their nearest other training image, pixel by pixel (train_id ->
    # evidence): what a pixel confirmation must beat.
    pixel_background: dict[str, PixelEvidence] = field(default_factory=dict)
    # The training images compared with one scan image against each other (train_id -> comparisons with
    # the larger ids): whether two matches are one duplicated patch (regions.same_region).
    region_pairs: dict[str, list[RegionEvidence]] = field(default_factory=dict)

    @property
    def copy_space(self) -> str:
        return "sscd" if self.sscd is not None else "clip"

    @property
    def copy_evidence(self) -> str:
        """sscd (joined against training SSCD embeddings) | sscd_candidates (two-stage) | clip."""
        if self.sscd is None:
            return "clip"
        return "sscd_candidates" if self.two_stage else "sscd"

    def embedding(self, space: str, row: int) -> np.ndarray:
        return (self.sscd if space == "sscd" else self.clip)[row]

    def restricted(self, prompt_ids: set[str]) -> LabelInputs:
        """The same inputs for a subset of prompts (calibration fits on the pilot's prompts only)."""
        keep = [i for i, g in enumerate(self.generations) if g["parent_prompt_id"] in prompt_ids]
        return LabelInputs(
            [self.generations[i] for i in keep],
            self.clip[keep],
            None if self.sscd is None else self.sscd[keep],
            {p: c for p, c in self.contexts.items() if p in prompt_ids},
            self.texts,
            self.neighbors,
            self.background,
            self.pixels,
            self.missing,
            self.two_stage,
            self.regions,
            self.region_background,
            self.pixel_background,
            self.region_pairs,
        )

    def scored_scan_units(self) -> list[str]:
        return [g["unit_id"] for g in self.generations if g["role"] == ROLE_SCAN and g["status"] == STATUS_OK]

    # -- builders --------------------------------------------------------------------------------------
    @classmethod
    def from_tables(cls, tables: Mapping[str, pa.Table]) -> LabelInputs:
        """From a scan's tables (as staged by the scan, or read back from a published scan)."""
        generations = tables["generations"]
        embedding_columns = [SPACE_COLUMNS["clip"], SPACE_COLUMNS["sscd"]]
        rows = generations.drop_columns([c for c in embedding_columns if c in generations.column_names]).to_pylist()
        clip = _matrix_with_nulls(generations.column(SPACE_COLUMNS["clip"]))
        sscd_column = generations.column(SPACE_COLUMNS["sscd"])
        sscd = _matrix_with_nulls(sscd_column) if pa.types.is_fixed_size_list(sscd_column.type) else None
        return cls(
            generations=rows,
            clip=clip,
            sscd=sscd,
            contexts=_contexts(tables["prompts"], tables["texts"], tables["entities"]),
            texts=_texts(tables["texts"]),
            neighbors=_neighbors(tables["neighbors"]),
            background={
                r["space"]: Background(r["space"], r["p95"], r["n"])
                for r in tables["background"].select(["space", "p95", "n"]).to_pylist()
            },
            pixels=pixel_evidence(tables["pixel_checks"]),
            missing=missing_evidence(tables["candidates"]),
            two_stage=bool(tables["candidates"].num_rows),
            regions=region_evidence(tables.get("region_checks")),
            region_background=region_evidence(tables.get("region_checks"), "background"),
            region_pairs=region_evidence(tables.get("region_checks"), "training_pairs"),
            pixel_background=pixel_evidence(tables["pixel_checks"], "background"),
        )

    @classmethod
    def read(cls, root: str, scan_id: str) -> LabelInputs:
        """From a complete published scan under an output root."""
        from raymem.outputs import read_manifest, read_scan_table
        from raymem.schema import CANDIDATES

        listed = read_manifest(root, scan_id).get("tables") or {}
        tables = {
            name: read_scan_table(root, scan_id, name)
            for name in INPUT_TABLES
            if name in listed or name not in ("candidates", "region_checks")  # both are newer than some scans
        }
        tables.setdefault("candidates", CANDIDATES.empty_table())  # scans published before two-stage copy detection
        return cls.from_tables(tables)

    @classmethod
    def from_rows(
        cls,
        generations: list[dict],
        contexts: dict[str, PromptContext],
        texts: dict[str, np.ndarray],
        neighbors: dict[str, dict[str, list[dict]]],
        background: dict[str, Background],
        pixels: dict[str, PixelEvidence] | None = None,
        pixel_background: dict[str, PixelEvidence] | None = None,
    ) -> LabelInputs:
        """From generation rows that carry their embeddings (`clip_embedding`, `sscd_embedding`) as
        arrays: for tests and callers that build inputs by hand."""

        def stack(column: str) -> np.ndarray | None:
            values = [g.get(column) for g in generations]
            present = [np.asarray(v, np.float32) for v in values if v is not None]
            if not present:
                return None
            dim = present[0].shape[0]
            return np.stack([np.asarray(v, np.float32) if v is not None else np.zeros(dim, np.float32) for v in values])

        rows = [{k: v for k, v in g.items() if k not in SPACE_COLUMNS.values()} for g in generations]
        clip = stack(SPACE_COLUMNS["clip"])
        return cls(
            rows,
            clip if clip is not None else np.zeros((len(rows), 0), np.float32),
            stack(SPACE_COLUMNS["sscd"]),
            contexts,
            texts,
            neighbors,
            background,
            pixels or {},
            pixel_background=pixel_background or {},
        )


def pixel_evidence(pixel_checks: pa.Table, query_set: str = "units") -> dict[str, PixelEvidence]:
    """{unit_id: tiled pixel l2 to its copy candidate} from the `pixel_checks` table (query_set
    "background": {sampled train_id: to its nearest other training image}). Scans published before
    the pixel background have no query_set: every row is a scan image."""
    return {
        r["unit_id"]: PixelEvidence(
            r["train_id"], tuple(r["tile_l2"]) if r["tile_l2"] is not None else None, r["error"], r.get("score")
        )
        for r in pixel_checks.to_pylist()
        if r.get("query_set", "units") == query_set
    }


def _matrix_with_nulls(column: pa.ChunkedArray) -> np.ndarray:
    """(n, d) float32; a null embedding (a failed unit) becomes a zero row."""
    dim = column.type.list_size
    if not column.null_count:
        return embedding_matrix(column)
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    out = np.zeros((len(column), dim), np.float32)
    out[valid] = embedding_matrix(column.filter(pc.is_valid(column)))
    return out


def _texts(texts: pa.Table) -> dict[str, np.ndarray]:
    if not texts.num_rows:
        return {}
    matrix = embedding_matrix(texts.column("clip_embedding"))
    return {text: matrix[i] for i, text in enumerate(texts.column("text").to_pylist())}


def _associations(row: dict) -> EntityAssociations | None:
    if not row["mined"]:
        return None
    return EntityAssociations(
        row["entity"],
        row["n_tagged"],
        row["n_captions"],
        [Association(**a) for a in row["implied"] or ()],
        [Association(**a) for a in row["instance"] or ()],
    )


def _contexts(prompts: pa.Table, texts: pa.Table, entities: pa.Table) -> dict[str, PromptContext]:
    probes: dict[str, list[Probe]] = defaultdict(list)
    for r in texts.select(["prompt_id", "kind", "element", "text"]).to_pylist():
        probes[r["prompt_id"]].append(Probe(r["kind"], r["element"], r["text"]))
    centroids = (
        _matrix_with_nulls(entities.column("clip_centroid")) if entities.num_rows else np.zeros((0, 0), np.float32)
    )
    has_centroid = entities.column("clip_centroid").is_valid().to_pylist()
    by_entity = {}
    for i, r in enumerate(entities.drop_columns(["clip_centroid"]).to_pylist()):
        reference = None
        if r["train_frequency"] is not None:
            copies = tuple((c["train_id"], c["image_uri"]) for c in r.get("work_copies") or ())
            reference = EntityStats(r["train_frequency"], centroids[i] if has_centroid[i] else None, copies)
        by_entity[r["entity"]] = (reference, _associations(r))
    contexts = {}
    for p in prompts.to_pylist():
        reference, associations = by_entity.get(p["entity"], (None, None))
        contexts[p["prompt_id"]] = PromptContext(
            p["prompt_id"],
            p["prompt"],
            p["entity"],
            p["entity_class"],
            tuple(probes.get(p["prompt_id"], ())),
            associations,
            reference,
            bool(p.get("requests_work")),  # absent in scans published before the column
        )
    return contexts


def _neighbors(neighbors: pa.Table) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    table = neighbors.sort_by([("unit_id", "ascending"), ("space", "ascending"), ("rank", "ascending")])
    for n in table.to_pylist():
        out[n["unit_id"]][n["space"]].append(n)
    return {u: dict(spaces) for u, spaces in out.items()}


def missing_evidence(candidates: pa.Table) -> dict[str, tuple[int, int]]:
    """{unit_id: (candidates without an SSCD embedding, candidates)} from the `candidates` table."""
    if not candidates.num_rows:
        return {}
    units = candidates.filter(pc.equal(candidates.column("query_set"), "units"))
    out: dict[str, list[int]] = {}
    for uid, status in zip(units.column("query_id").to_pylist(), units.column("status").to_pylist()):
        counts = out.setdefault(uid, [0, 0])
        counts[1] += 1
        counts[0] += status != "ok"
    return {u: (m, n) for u, (m, n) in out.items()}
