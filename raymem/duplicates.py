"""Near-duplicate structure among a generation's neighbours: the breadth of a match and the duplication
of the copied image.

Two different questions (Carlini et al. 2023 count the second; the first tells a copy from a look):

  breadth      how many *distinct* training images the generation resembles above the replication
               threshold -- training images that are near-duplicates of each other (SSCD >=
               `near_duplicate`, or the same `image_hash`) count once. Many distinct ones: a generic look,
               not a copy (gated against `eidetic_k`).
  duplication  how many times the copied image is in the training set (its near-duplicate group among
               the neighbours, capped by `join.k`): reported, never gating -- a copy of an image seen
               once is the worst privacy case, not a lesser one.

Both need the similarity of neighbours to *each other*: each neighbour row above the scan's replication
threshold carries `pair_scores`, its cosine to every other such neighbour of the same generation (by
rank; null where not computed). The embeddings come from the training table (Parquet rows read back by
train_id from the files the join found them in) or, with two-stage copy detection, from the fetched
candidates. Rows below the threshold carry none: a recalibration to a lower threshold falls back to
counting distinct images (exact duplicates by `image_hash`) for them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raymem import uri as uris
from raymem.sources import to_text


def attach_pair_scores(
    rows_per_query: list[list[dict]], floor: float | None, embedding_of: Callable[[dict], np.ndarray | None]
) -> None:
    """Set `pair_scores` on every row with score >= floor: its cosine to each row of the same query (by
    rank), None for rows below the floor or without an embedding."""
    if floor is None:
        return
    for rows in rows_per_query:
        idx = [j for j, r in enumerate(rows) if r["score"] >= floor]
        vectors = {j: embedding_of(rows[j]) for j in idx}
        idx = [j for j in idx if vectors[j] is not None]
        if not idx:
            continue
        matrix = np.stack([vectors[j] for j in idx]).astype(np.float32)
        sims = matrix @ matrix.T
        pos = {j: a for a, j in enumerate(idx)}
        for j in idx:
            rows[j]["pair_scores"] = [float(sims[pos[j], pos[b]]) if b in pos else None for b in range(len(rows))]


def read_embeddings(column: str, wanted: dict[str, set[str]]) -> dict[tuple[str, str], np.ndarray]:
    """{(path, train_id): embedding} for the wanted train_ids of each Parquet file (two columns read)."""
    from raymem.schema import embedding_matrix

    out: dict[tuple[str, str], np.ndarray] = {}
    for path, ids in wanted.items():
        fs, p = uris.filesystem(path)
        table = pq.read_table(p, filesystem=fs, columns=["train_id", column])
        tid = to_text(table.column("train_id"))
        table = table.filter(pc.is_in(tid, value_set=pa.array(sorted(ids), pa.string())))
        matrix = embedding_matrix(table.column(column))
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix = matrix / np.maximum(norms, 1e-12)
        for i, t in enumerate(to_text(table.column("train_id")).to_pylist()):
            out[(path, t)] = matrix[i]
    return out


def rows_to_read(rows_per_query: list[list[dict]], floor: float) -> dict[str, set[str]]:
    wanted: dict[str, set[str]] = defaultdict(set)
    for rows in rows_per_query:
        for r in rows:
            if r["score"] >= floor and r.get("path"):
                wanted[r["path"]].add(str(r["train_id"]))
    return wanted


def components(items: list, same: Callable[[object, object], bool]) -> list[int]:
    """Connected components of `items` under the pairwise relation `same` (union-find over every
    pair): per item, the position of its component's representative -- equal labels, one group."""
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if same(items[i], items[j]):
                parent[root(i)] = root(j)
    return [root(i) for i in range(len(items))]


def groups(nbrs: list[dict], threshold: float, link: float | None) -> tuple[int, int, bool]:
    """(breadth, duplication, exact) for one generation's neighbours in the copy space.

    breadth: near-duplicate groups among the neighbours scoring >= threshold; duplication: the size of
    the top-1 neighbour's group among all neighbours with pair scores (at least its exact duplicates);
    exact: whether pair scores were available for every neighbour above the threshold (else groups
    are exact duplicates only: same image_hash, or the same train_id)."""
    above = [j for j, n in enumerate(nbrs) if n["score"] >= threshold]
    if not nbrs:
        return 0, 0, True
    exact = link is not None and all(nbrs[j].get("pair_scores") is not None for j in above)

    def same(a: int, b: int) -> bool:
        ha, hb = nbrs[a].get("image_hash"), nbrs[b].get("image_hash")
        if ha and ha == hb:
            return True
        scores = nbrs[a].get("pair_scores")
        return bool(exact and scores is not None and scores[b] is not None and scores[b] >= link)

    breadth = len(set(components(above, same)))
    duplication = 1 + sum(1 for b in range(1, len(nbrs)) if same(0, b))
    return breadth, duplication, exact
