"""Per scanned entity: how many training images carry its tag, and the mean of their CLIP embeddings.

One streamed pass over the `entities` and `clip_embedding` columns of the training table. The result is
published as the scan's `entities` table (with what mining found for the entity), which is the
labeler's reference for "is the entity rendered?" (paper-spec F_i).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from raymem import runtime
from raymem.label_inputs import EntityStats
from raymem.mining import EntityAssociations
from raymem.schema import embedding_array, embedding_matrix, entities_schema
from raymem.sources import TrainingTable, source_for


def _hash(train_id: str) -> int:
    """A train_id's place in the work-copy sample: stable across runs and machines (not Python's hash)."""
    return int.from_bytes(hashlib.blake2b(train_id.encode(), digest_size=8).digest(), "big")


def _bottom(candidates, k: int) -> list[tuple[int, str, str | None]]:
    """The `k` smallest (hash, train_id, image_uri) -- a uniform sample whatever the order rows arrive in."""
    return sorted(set(candidates))[:k]


@runtime.reraise_user_errors
def entity_stats(
    training: TrainingTable, entities: set[str], works: set[str] = frozenset(), work_copies: int = 0
) -> dict[str, EntityStats]:
    """Tagged rows and the normalised mean of their CLIP embeddings, per entity; empty when the table has
    no entity tags. For the entities in `works` (prompts that request a work), also a sample of up to
    `work_copies` of their tagged rows, (train_id, image_uri): the rows with the smallest train_id hash,
    a bottom-k sample in bounded memory, chosen without looking at any scan image."""
    if "entities" not in training.columns or not entities or training.layout != "parquet":
        return {}
    wanted = sorted(entities)
    dim = training.dims.get("clip")
    sampled = sorted(works & entities) if work_copies > 0 else []
    has_uri = "image_uri" in training.columns

    def accumulate(batch: pa.Table) -> pa.Table:
        tags = batch.column("entities").to_pylist()
        emb = embedding_matrix(batch.column("clip_embedding")) if dim else None
        counts = dict.fromkeys(wanted, 0)
        sums = {e: np.zeros(dim or 1, np.float64) for e in wanted}
        copies: dict[str, list] = {e: [] for e in wanted}
        ids = batch.column("train_id").to_pylist() if sampled else None
        uris = batch.column("image_uri").to_pylist() if sampled and has_uri else None
        for i, row in enumerate(tags):
            for e in row or ():
                if e in counts:
                    counts[e] += 1
                    if emb is not None:
                        sums[e] += emb[i]
                    if ids is not None and e in sampled and ids[i] is not None:
                        copies[e].append((_hash(ids[i]), ids[i], uris[i] if uris else None))
        return pa.table(
            {
                "entity": wanted,
                "n": [counts[e] for e in wanted],
                "sum": [sums[e].tolist() for e in wanted],
                "copies": [[[str(h), t, u] for h, t, u in _bottom(copies[e], work_copies)] for e in wanted],
            },
            schema=_PARTIAL,
        )

    columns = ["entities", *(["clip_embedding"] if dim else [])]
    columns += ["train_id", *(["image_uri"] if has_uri else [])] if sampled else []
    ds = source_for(training.layout).dataset(training, columns)
    counts = dict.fromkeys(wanted, 0)
    sums = {e: np.zeros(dim or 1, np.float64) for e in wanted}
    copies: dict[str, list] = {e: [] for e in wanted}
    for batch in runtime.named(ds.map_batches(accumulate, batch_format="pyarrow", batch_size=65_536), "entity_stats"):
        for e, n, total, found in zip(*(batch.column(c).to_pylist() for c in ("entity", "n", "sum", "copies"))):
            counts[e] += n
            sums[e] += np.asarray(total)
            copies[e] = _bottom(copies[e] + [(int(h), t, u) for h, t, u in found], work_copies)
    out = {}
    for e in wanted:
        centroid = None
        if dim and counts[e]:
            centroid = (sums[e] / max(np.linalg.norm(sums[e]), 1e-12)).astype(np.float32)
        out[e] = EntityStats(counts[e], centroid, tuple((t, u) for _, t, u in copies[e]))
    return out


# one batch's partial sums; a sampled copy travels as [hash, train_id, image_uri] strings (a uint64 hash
# does not fit int64)
_PARTIAL = pa.schema(
    [
        ("entity", pa.string()),
        ("n", pa.int64()),
        ("sum", pa.list_(pa.float64())),
        ("copies", pa.list_(pa.list_(pa.string()))),
    ]
)


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
