"""Per scanned entity: how many training images carry its tag, and the mean of their CLIP embeddings.

One streamed pass over the `entities` and `clip_embedding` columns of the training table: the exact
join's own read, or a read of its own (`raymem.passes`). The result is
published as the scan's `entities` table (with what mining found for the entity), which is the
labeler's reference for "is the entity rendered?" (paper-spec F_i).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymem.label_inputs import EntityStats
from raymem.mining import EntityAssociations
from raymem.passes import TablePass, run_passes
from raymem.schema import embedding_array, embedding_matrix, entities_schema
from raymem.sources import TrainingTable


def _hash(train_id: str) -> int:
    """A train_id's place in the work-copy sample: stable across runs and machines (not Python's hash)."""
    return int.from_bytes(hashlib.blake2b(train_id.encode(), digest_size=8).digest(), "big")


def _bottom(candidates, k: int) -> list[tuple[int, str, str | None]]:
    """The `k` smallest (hash, train_id, image_uri) -- a uniform sample whatever the order rows arrive in."""
    return sorted(set(candidates))[:k]


class EntityStatsPass(TablePass):
    """Per wanted entity: tagged rows, the sum of their CLIP embeddings (float64), and the bottom-k sample
    of work copies; vectorised over an item's rows (Arrow's list kernels, one gather per entity)."""

    name = "entity_stats"
    # one item's partial sums; a sampled copy travels as [hash, train_id, image_uri] strings (a uint64 hash
    # does not fit int64)
    partial_schema = pa.schema(
        [
            ("entity", pa.string()),
            ("n", pa.int64()),
            ("sum", pa.list_(pa.float64())),
            ("copies", pa.list_(pa.list_(pa.string()))),
        ]
    )

    def __init__(
        self, training: TrainingTable, entities: set[str], works: set[str] = frozenset(), work_copies: int = 0
    ):
        self.wanted = sorted(entities)
        self.dim = training.dims.get("clip")
        self.sampled = sorted(works & entities) if work_copies > 0 else []
        self.work_copies = work_copies
        self.has_uri = "image_uri" in training.columns
        columns = ["entities", *(["clip_embedding"] if self.dim else [])]
        columns += ["train_id", *(["image_uri"] if self.has_uri else [])] if self.sampled else []
        self.columns = tuple(columns)

    def start(self, items: list[dict], source) -> None:
        self._counts = dict.fromkeys(self.wanted, 0)
        self._sums = {e: np.zeros(self.dim or 1, np.float64) for e in self.wanted}
        self._copies: dict[str, list] = {e: [] for e in self.wanted}

    def partial(self, table: pa.Table, item: dict | None = None) -> pa.Table:
        tags = table.column("entities").combine_chunks()
        found = pc.index_in(pc.list_flatten(tags), value_set=pa.array(self.wanted, pa.string()))
        codes = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
        rows = pc.list_parent_indices(tags).to_numpy(zero_copy_only=False)
        keep = codes >= 0
        codes, rows = codes[keep], rows[keep]
        counts = np.bincount(codes, minlength=len(self.wanted))
        sums = np.zeros((len(self.wanted), self.dim or 1), np.float64)
        by_entity = np.split(rows[np.argsort(codes, kind="stable")], np.cumsum(counts)[:-1])
        if self.dim and len(codes):
            emb = embedding_matrix(table.column("clip_embedding"))
            for e in np.flatnonzero(counts):
                sums[e] = emb[by_entity[e]].sum(axis=0, dtype=np.float64)
        copies: dict[str, list] = {e: [] for e in self.sampled}
        if self.sampled:
            ids = table.column("train_id")
            uris = table.column("image_uri") if self.has_uri else None
            for e in self.sampled:
                for row in by_entity[self.wanted.index(e)]:
                    tid = ids[int(row)].as_py()
                    if tid is not None:
                        copies[e].append((_hash(tid), tid, uris[int(row)].as_py() if uris is not None else None))
        return pa.table(
            {
                "entity": self.wanted,
                "n": counts.tolist(),
                "sum": [row.tolist() for row in sums],
                "copies": [
                    [[str(h), t, u] for h, t, u in _bottom(copies.get(e, []), self.work_copies)] for e in self.wanted
                ],
            },
            schema=self.partial_schema,
        )

    def fold(self, partial: pa.Table) -> None:
        for e, n, total, found in zip(*(partial.column(c).to_pylist() for c in ("entity", "n", "sum", "copies"))):
            self._counts[e] += n
            self._sums[e] += np.asarray(total)
            self._copies[e] = _bottom(self._copies[e] + [(int(h), t, u) for h, t, u in found], self.work_copies)

    def result(self) -> dict[str, EntityStats]:
        out = {}
        for e in self.wanted:
            centroid = None
            if self.dim and self._counts[e]:
                centroid = (self._sums[e] / max(np.linalg.norm(self._sums[e]), 1e-12)).astype(np.float32)
            out[e] = EntityStats(self._counts[e], centroid, tuple((t, u) for _, t, u in self._copies[e]))
        return out


def wants_entity_stats(training: TrainingTable, entities: set[str]) -> bool:
    """Whether the table can say anything about the entities: tags, in a Parquet table."""
    return "entities" in training.columns and bool(entities) and training.layout == "parquet"


def entity_stats(
    training: TrainingTable, entities: set[str], works: set[str] = frozenset(), work_copies: int = 0
) -> dict[str, EntityStats]:
    """Tagged rows and the normalised mean of their CLIP embeddings, per entity; empty when the table has
    no entity tags. For the entities in `works` (prompts that request a work), also a sample of up to
    `work_copies` of their tagged rows, (train_id, image_uri): the rows with the smallest train_id hash,
    a bottom-k sample in bounded memory, chosen without looking at any scan image. On a read of its own
    (the exact join computes the same on its read: `EntityStatsPass`)."""
    if not wants_entity_stats(training, entities):
        return {}
    stats = EntityStatsPass(training, entities, works, work_copies)
    run_passes(training, [stats], fragment_rows=65_536, name="entity_stats")
    return stats.result()


def entities_table(
    scan_id: str,
    entities: list[str],
    stats: dict[str, EntityStats],
    associations: dict[str, EntityAssociations],
    clip_dim: int,
) -> pa.Table:
    """The published `entities` table: one row per scanned entity."""
    rows = []
    centroids = np.zeros((len(entities), clip_dim), np.float32)
    valid = np.zeros(len(entities), bool)
    for i, e in enumerate(entities):
        st, assoc = stats.get(e), associations.get(e)
        if st is not None and st.centroid is not None:
            centroids[i], valid[i] = st.centroid, True
        rows.append(
            {
                "scan_id": scan_id,
                "entity": e,
                "train_frequency": st.count if st is not None else None,
                "mined": assoc is not None,
                "n_tagged": assoc.n_entity if assoc else None,
                "n_captions": assoc.n_total if assoc else None,
                "implied": [vars(a) for a in assoc.implied] if assoc else None,
                "instance": [vars(a) for a in assoc.instance] if assoc else None,
                "work_copies": [{"train_id": t, "image_uri": u} for t, u in st.work_copies] if st is not None else [],
            }
        )
    schema = entities_schema(clip_dim)
    table = pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index("clip_centroid")))
    table = table.add_column(
        schema.get_field_index("clip_centroid"), "clip_centroid", embedding_array(centroids, clip_dim, valid)
    )
    return table.cast(schema)
