"""Per scanned entity: how many training images carry its tag, and the mean of their CLIP embeddings.

One streamed pass over the `entities` and `clip_embedding` columns of the training table. The result is
published as the scan's `entities` table (with what mining found for the entity), which is the
labeler's reference for "is the entity rendered?" (paper-spec F_i).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raymem import runtime
from raymem.label_inputs import EntityStats
from raymem.mining import EntityAssociations
from raymem.schema import embedding_array, embedding_matrix, entities_schema
from raymem.sources import TrainingTable, source_for


@runtime.reraise_user_errors
def entity_stats(training: TrainingTable, entities: set[str]) -> dict[str, EntityStats]:
    """Tagged rows and the normalised mean of their CLIP embeddings, per entity; empty when the table has
    no entity tags."""
    if "entities" not in training.columns or not entities or training.layout != "parquet":
        return {}
    wanted = sorted(entities)
    dim = training.dims.get("clip")

    def accumulate(batch: pa.Table) -> pa.Table:
        tags = batch.column("entities").to_pylist()
        emb = embedding_matrix(batch.column("clip_embedding")) if dim else None
        counts = dict.fromkeys(wanted, 0)
        sums = {e: np.zeros(dim or 1, np.float64) for e in wanted}
        for i, row in enumerate(tags):
            for e in row or ():
                if e in counts:
                    counts[e] += 1
                    if emb is not None:
                        sums[e] += emb[i]
        return pa.table({"entity": wanted, "n": [counts[e] for e in wanted], "sum": [sums[e].tolist() for e in wanted]})

    columns = ["entities", *(["clip_embedding"] if dim else [])]
    ds = source_for(training.layout).dataset(training, columns)
    counts = dict.fromkeys(wanted, 0)
    sums = {e: np.zeros(dim or 1, np.float64) for e in wanted}
    for batch in runtime.named(ds.map_batches(accumulate, batch_format="pyarrow", batch_size=65_536), "entity_stats"):
        for e, n, total in zip(*(batch.column(c).to_pylist() for c in ("entity", "n", "sum"))):
            counts[e] += n
            sums[e] += np.asarray(total)
    out = {}
    for e in wanted:
        centroid = None
        if dim and counts[e]:
            centroid = (sums[e] / max(np.linalg.norm(sums[e]), 1e-12)).astype(np.float32)
        out[e] = EntityStats(counts[e], centroid)
    return out


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
            }
        )
    schema = entities_schema(clip_dim)
    table = pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index("clip_centroid")))
    table = table.add_column(
        schema.get_field_index("clip_centroid"), "clip_centroid", embedding_array(centroids, clip_dim, valid)
    )
    return table.cast(schema)
