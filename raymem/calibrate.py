"""`raymem calibrate`: fit the labeler's thresholds on a small human-labelled pilot set.

The pilot is a Parquet (or CSV/JSONL) table of `unit_id` (or `image_uri`) and `label` (MU, MI, ME or
none) for images of one complete scan. Every labeler input is read back from that scan's published
tables (generations, texts, neighbors, labels, manifest), so fitting re-runs only the decision, never
the models. Thresholds are fitted one at a time, category by category in precedence order (MU, then
MI, then ME): each takes the value with the highest recall among those reaching the target precision
on the pilot, or the most precise value when none does (reported as missed).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from raymem import uri as uris
from raymem.config import ThresholdsConfig
from raymem.errors import InputError
from raymem.label import Background, PromptContext, label_units
from raymem.mining import Association, EntityAssociations
from raymem.outputs import read_manifest, read_scan_table
from raymem.pixels import PixelEvidence
from raymem.probes import Probe
from raymem.prompts import read_records
from raymem.schema import LABELS, embedding_matrix

# Candidate values per threshold, and which category each one is fitted for (in precedence order).
GRID = {
    "replication": [round(x, 2) for x in np.arange(0.30, 0.96, 0.05)],
    "pixel_l2": [0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20],
    "consistency": [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
    "element_presence": [round(x, 2) for x in np.arange(0.30, 0.91, 0.05)],
    "null_z": [round(x, 2) for x in np.arange(0.0, 4.01, 0.25)],
}
FIT_ORDER = (
    ("MU", ("replication", "pixel_l2")),
    ("MI", ("consistency", "element_presence")),
    ("ME", ("null_z",)),
)


@dataclass
class Evidence:
    """Everything the labeler needs for a scan, rebuilt from its published tables."""

    generations: list[dict]
    contexts: dict[str, PromptContext]
    texts: dict[str, np.ndarray]
    neighbors: dict[str, dict[str, list[dict]]]
    background: dict[str, Background]
    pixels: dict[str, PixelEvidence]

    def restricted(self, prompt_ids: set[str]) -> Evidence:
        gens = [g for g in self.generations if g["parent_prompt_id"] in prompt_ids]
        return Evidence(
            gens,
            {p: c for p, c in self.contexts.items() if p in prompt_ids},
            self.texts,
            self.neighbors,
            self.background,
            self.pixels,
        )

    def label(self, thresholds: ThresholdsConfig) -> list[dict]:
        return label_units(
            self.generations, self.contexts, self.texts, self.neighbors, self.background, thresholds, self.pixels
        )


def load_evidence(root: str, scan_id: str) -> Evidence:
    manifest = read_manifest(root, scan_id)
    gens = read_scan_table(root, scan_id, "generations").to_pylist()
    texts_t = read_scan_table(root, scan_id, "texts")
    labels = read_scan_table(root, scan_id, "labels").to_pylist()
    neighbors_t = read_scan_table(root, scan_id, "neighbors").to_pylist()

    matrix = embedding_matrix(texts_t.column("clip_embedding")) if texts_t.num_rows else np.zeros((0, 0))
    texts = {text: matrix[i] for i, text in enumerate(texts_t.column("text").to_pylist())}
    probes: dict[str, list[Probe]] = defaultdict(list)
    for r in texts_t.select(["prompt_id", "kind", "element", "text"]).to_pylist():
        probes[r["prompt_id"]].append(Probe(r["kind"], r["element"], r["text"]))
    mined = manifest.get("counts", {}).get("mined_elements", {})
    associations = {
        e: EntityAssociations(
            e, 0, 0, [Association(**a) for a in m["implied"]], [Association(**a) for a in m["instance"]]
        )
        for e, m in mined.items()
    }
    contexts = {}
    for g in gens:
        pid = g["parent_prompt_id"]
        if g["role"] != "scan" or pid in contexts:
            continue
        ps = probes.get(pid, [])
        cls = next((p.element for p in ps if p.kind == "entity_null"), "")
        contexts[pid] = PromptContext(pid, g["prompt"], g["entity"], cls, tuple(ps), associations.get(g["entity"]))
    neighbors: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for n in sorted(neighbors_t, key=lambda n: n["rank"]):
        neighbors[n["unit_id"]][n["space"]].append(n)
    space = "sscd" if any("sscd" in s for s in neighbors.values()) else "clip"
    p95 = next((r["background_p95"] for r in labels if r.get("background_p95") is not None), None)
    background = {space: Background(space, p95, 0)} if p95 is not None else {}
    pixels = {
        r["unit_id"]: PixelEvidence(r["replication_train_id"], tuple(r["pixel_tile_l2"]))
        for r in labels
        if r.get("pixel_tile_l2")
    }
    return Evidence(gens, contexts, texts, dict(neighbors), background, pixels)


def read_pilot(source: str, evidence: Evidence) -> dict[str, str]:
    """{unit_id: human label}, validated against the scan."""
    try:
        data = uris.read_bytes(source)
    except FileNotFoundError:
        raise InputError(source, "pilot set not found") from None
    columns, records = read_records(source, data)
    key = "unit_id" if "unit_id" in columns else "image_uri" if "image_uri" in columns else None
    if key is None:
        raise InputError(source, "required column is missing (unit_id or image_uri)", field="unit_id")
    if "label" not in columns:
        raise InputError(source, "required column is missing", field="label")
    by_image = {g["image_uri"]: g["unit_id"] for g in evidence.generations if g.get("image_uri")}
    scan_units = {g["unit_id"] for g in evidence.generations if g["role"] == "scan" and g["status"] == "ok"}
    pilot = {}
    for number, record in records:
        label = record.get("label")
        if label not in LABELS:
            raise InputError(
                source, f"label must be one of {', '.join(LABELS)}, got {label!r}", row=number, field="label"
            )
        ref = record.get(key)
        uid = by_image.get(ref) if key == "image_uri" else ref
        if uid not in scan_units:
            raise InputError(source, f"{ref!r} is not a scored image of this scan", row=number, field=key)
        pilot[uid] = label
    if not pilot:
        raise InputError(source, "the pilot set has no rows")
    return pilot


def precision_recall(labels: list[dict], pilot: dict[str, str]) -> dict[str, dict]:
    predicted = {r["unit_id"]: r["label"] for r in labels if r["unit_id"] in pilot}
    out = {}
    for category in LABELS:
        tp = sum(1 for u, h in pilot.items() if h == category and predicted.get(u) == category)
        n_pred = sum(1 for u in pilot if predicted.get(u) == category)
        n_true = sum(1 for h in pilot.values() if h == category)
        out[category] = {
            "n": n_true,
            "predicted": n_pred,
            "precision": tp / n_pred if n_pred else None,
            "recall": tp / n_true if n_true else None,
        }
    return out


def _with(t: ThresholdsConfig, name: str, value: float) -> ThresholdsConfig:
    update = {name: value}
    if name == "replication" and value > t.verbatim:
        update["verbatim"] = value
    return t.model_copy(update=update)


def _candidates(name: str, ev: Evidence, pilot: dict[str, str]) -> list[float]:
    """The grid, plus for `replication` every pilot image's top-1 score (the optimum sits on one of them)."""
    values = set(GRID[name])
    if name == "replication":
        for uid in pilot:
            spaces = ev.neighbors.get(uid, {})
            nbrs = spaces.get("sscd") or spaces.get("clip") or []
            if nbrs:
                values.add(float(nbrs[0]["score"]))
    return sorted(values)


def fit(evidence: Evidence, pilot: dict[str, str], start: ThresholdsConfig, target: float):
    """Coordinate-wise fit; returns (fitted thresholds, {category: met target?})."""
    prompts = {g["parent_prompt_id"] for g in evidence.generations if g["unit_id"] in pilot}
    ev = evidence.restricted(prompts)
    t = start
    met = {}
    for category, names in FIT_ORDER:
        if not any(h == category for h in pilot.values()):
            continue
        for name in names:
            best_key, best_value = None, getattr(t, name)
            for value in _candidates(name, ev, pilot):
                pr = precision_recall(ev.label(_with(t, name, value)), pilot)[category]
                p, r = pr["precision"] or 0.0, pr["recall"] or 0.0
                key = (p >= target, r if p >= target else p, p if p >= target else r)
                if best_key is None or key > best_key:
                    best_key, best_value = key, value
            t = _with(t, name, best_value)
        precision = precision_recall(ev.label(t), pilot)[category]["precision"]
        met[category] = precision is not None and precision >= target
    return t, met


def report(before: dict, after: dict) -> str:
    def f(x):
        return "  -  " if x is None else f"{x:5.2f}"

    lines = ["category  n_human  precision  recall   ->  precision  recall"]
    for c in LABELS:
        b, a = before[c], after[c]
        lines.append(
            f"{c:8s}  {b['n']:7d}  {f(b['precision'])}      {f(b['recall'])}    ->  "
            f"{f(a['precision'])}      {f(a['recall'])}"
        )
    return "\n".join(lines)


def thresholds_yaml(t: ThresholdsConfig) -> str:
    import yaml

    return yaml.safe_dump({"thresholds": json.loads(t.model_dump_json())}, sort_keys=False)
