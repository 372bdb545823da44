"""Elements associated with an entity in the training captions (paper-spec §3.2: U(e), S(a, e)).

Two streaming passes over the training table's `caption` and `entities` columns (never the whole table
in one process): the first counts, for each scanned entity e, the terms of captions tagged e and how
many rows carry e; the second counts how many captions contain each candidate term at all. Then

    support(a, e) = training images tagged e whose caption contains a
    lift(a, e)    = P(a | e) / P(a)

Implied elements (MI candidates) have lift >= min_lift and support >= min_support: a generic,
distributed association. Instance elements (MU candidates) are seen with fewer than
`instance_support` images of e and never without e: a detail traced to a handful of images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from raymem import runtime
from raymem.captions import caption_terms
from raymem.sources import TrainingTable, source_for

MAX_CANDIDATES = 200  # per entity, by support, before the second pass


@dataclass(frozen=True)
class Association:
    element: str
    support: int
    frequency: int
    lift: float


@dataclass
class EntityAssociations:
    entity: str
    n_entity: int
    n_total: int
    implied: list[Association] = field(default_factory=list)
    instance: list[Association] = field(default_factory=list)

    def lookup(self, element: str) -> Association | None:
        for a in self.implied + self.instance:
            if a.element == element:
                return a
        return None


def _count_entity_terms(batch: pa.Table, wanted: list[str]) -> pa.Table:
    captions = batch.column("caption").to_pylist()
    tags = batch.column("entities").to_pylist()
    counts: Counter = Counter()
    wanted_set = set(wanted)
    for caption, ents in zip(captions, tags):
        hits = wanted_set.intersection(ents or ())
        if not hits:
            continue
        terms = caption_terms(caption)
        for e in hits:
            counts[(e, "")] += 1  # rows tagged e
            for t in terms:
                counts[(e, t)] += 1
    counts[("", "")] = len(captions)  # rows in total
    keys = list(counts)
    return pa.table(
        {"entity": [k[0] for k in keys], "term": [k[1] for k in keys], "n": [counts[k] for k in keys]},
        schema=pa.schema([("entity", pa.string()), ("term", pa.string()), ("n", pa.int64())]),
    )


def _count_terms(batch: pa.Table, candidates: list[str]) -> pa.Table:
    wanted = set(candidates)
    counts: Counter = Counter()
    for caption in batch.column("caption").to_pylist():
        for t in caption_terms(caption) & wanted:
            counts[t] += 1
    return pa.table(
        {"term": list(counts), "n": list(counts.values())}, schema=pa.schema([("term", pa.string()), ("n", pa.int64())])
    )


def _stream(training: TrainingTable, columns: list[str], fn, kwargs) -> list[pa.Table]:

    ds = source_for(training.layout).dataset(training, columns)
    out = ds.map_batches(fn, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=65_536)
    return list(out.iter_batches(batch_format="pyarrow", batch_size=None))


@runtime.reraise_user_errors
def mine_associations(
    training: TrainingTable,
    excluded: dict[str, set[str]],
    *,
    min_lift: float,
    min_support: int,
    instance_support: int,
    per_entity: int,
) -> dict[str, EntityAssociations]:
    """Associations for each entity in `excluded` (entity -> terms to leave out: its own words, the prompt's)."""
    if not excluded or not {"caption", "entities"} <= set(training.columns):
        return {}
    entities = sorted(excluded)
    counts: Counter = Counter()
    for batch in _stream(training, ["caption", "entities"], _count_entity_terms, {"wanted": entities}):
        for e, t, n in zip(*(batch.column(c).to_pylist() for c in ("entity", "term", "n"))):
            counts[(e, t)] += n
    total = counts[("", "")]
    candidates: dict[str, list[tuple[str, int]]] = {}
    for e in entities:
        terms = [(t, n) for (ent, t), n in counts.items() if ent == e and t and t not in excluded[e]]
        terms = [(t, n) for t, n in terms if not (set(t.split()) & excluded[e])]
        terms.sort(key=lambda x: (-x[1], x[0]))
        candidates[e] = terms[:MAX_CANDIDATES]
    vocabulary = sorted({t for terms in candidates.values() for t, _ in terms})
    frequency: Counter = Counter()
    if vocabulary:
        for batch in _stream(training, ["caption"], _count_terms, {"candidates": vocabulary}):
            for t, n in zip(batch.column("term").to_pylist(), batch.column("n").to_pylist()):
                frequency[t] += n
    out = {}
    for e in entities:
        n_e = counts[(e, "")]
        result = EntityAssociations(entity=e, n_entity=n_e, n_total=total)
        for t, support in candidates[e]:
            freq = max(frequency[t], support)
            lift = (support / n_e) / (freq / total) if n_e and total else 0.0
            assoc = Association(element=t, support=support, frequency=freq, lift=lift)
            if support >= min_support and lift >= min_lift:
                result.implied.append(assoc)
            elif 2 <= support < instance_support and freq == support:
                result.instance.append(assoc)
        result.implied = _drop_subsumed(sorted(result.implied, key=lambda a: (-a.support, -a.lift, a.element)))
        result.implied = result.implied[:per_entity]
        result.instance = sorted(result.instance, key=lambda a: (-a.support, a.element))[:per_entity]
        out[e] = result
    return out


def _drop_subsumed(assocs: list[Association]) -> list[Association]:
    """'rocky' is redundant beside 'rocky shore' when nearly every caption with one has the other."""
    keep = []
    for a in assocs:
        if " " not in a.element and any(
            a.element in b.element.split() and b.support >= 0.8 * a.support for b in assocs if " " in b.element
        ):
            continue
        keep.append(a)
    return keep


def excluded_terms(prompt: str, entity: str, explicit: tuple[str, ...]) -> set[str]:
    """Words that cannot be unprompted elements of this prompt: the entity's, the prompt's, the explicit ones'."""
    words: set[str] = set()
    for text in (prompt, entity, *explicit):
        words |= caption_terms(text)
    return words
