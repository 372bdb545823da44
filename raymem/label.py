"""The labeler: every generated image gets MU, MI, ME or none, with the flags and numbers behind it.

Rules (see docs/labeler.md; thresholds live in `thresholds:` of the config), primary label by
precedence MU > MI > ME > none:
  MU  replication: top-1 copy-detection (SSCD) similarity R >= replication, R above the train-train
      background p95, and at most `eidetic_k` training images above `replication` (a near-unique image
      was copied). Subtype verbatim if R >= verbatim, else partial.
  MI  an implied element (listed in the prompt set, not named in the prompt) is shown in this image
      and in at least `consistency` of the prompt's seeds, with no replication.
  ME  the named entity is rendered (beyond its class noun, or above the CLIP floor when no class
      noun is given) and every explicit element is shown, with no replication.
Per prompt, `consistency` is the share of its seeds in the largest near-duplicate cluster (copy
similarity >= cluster_similarity); `memorized_prompt` when that share reaches `consistency`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from raymem.config import ThresholdsConfig
from raymem.probes import two_way_probability
from raymem.schema import STATUS_OK


@dataclass(frozen=True)
class Background:
    """Train-train nearest-neighbour similarity (DCR's background) in one embedding space."""

    space: str
    p95: float
    n: int


def largest_cluster(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean membership of the largest connected component of the `sim >= threshold` graph."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=bool)
    adjacent = (embeddings @ embeddings.T) >= threshold
    component = -np.ones(n, dtype=int)
    for start in range(n):
        if component[start] >= 0:
            continue
        stack = [start]
        component[start] = start
        while stack:
            node = stack.pop()
            for nxt in np.flatnonzero(adjacent[node]):
                if component[nxt] < 0:
                    component[nxt] = start
                    stack.append(nxt)
    labels, counts = np.unique(component, return_counts=True)
    best = labels[np.argmax(counts)]
    return component == best


def _probe_scores(probes: list[dict] | None) -> dict[tuple[str, str], float]:
    return {(p["kind"], p["element"]): p["score"] for p in probes or []}


def element_presence(probes: list[dict] | None, entity: str, kinds=("explicit", "implicit")) -> list[dict]:
    """Zero-shot presence of each element: 'e with a' against 'e' at CLIP's logit scale."""
    scores = _probe_scores(probes)
    base = scores.get(("entity", entity))
    out = []
    for (kind, element), s in scores.items():
        if kind in kinds and base is not None:
            out.append({"element": element, "kind": kind, "presence": two_way_probability(s, base)})
    return out


def entity_presence(probes: list[dict] | None, entity: str) -> float | None:
    """P(entity rather than its class noun); None when the prompt set gives no class noun."""
    scores = _probe_scores(probes)
    null = [s for (kind, _), s in scores.items() if kind == "entity_null"]
    if not null or ("entity", entity) not in scores:
        return None
    return two_way_probability(scores[("entity", entity)], null[0])


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def label_units(
    generations: list[dict],
    neighbors: dict[str, dict[str, list[dict]]],
    background: dict[str, Background],
    thresholds: ThresholdsConfig,
) -> list[dict]:
    """One label row per generation row (failed units keep their status and get no label)."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for g in generations:
        by_prompt[g["prompt_id"]].append(g)
    out = []
    for rows in by_prompt.values():
        out += _label_prompt(rows, neighbors, background, thresholds)
    return out


def _copy_space(row: dict) -> str:
    return "sscd" if row.get("sscd_embedding") is not None else "clip"


def _label_prompt(rows, neighbors, background, t: ThresholdsConfig) -> list[dict]:
    ok = [r for r in rows if r["status"] == STATUS_OK]
    space = _copy_space(ok[0]) if ok else "sscd"
    column = "sscd_embedding" if space == "sscd" else "clip_embedding"
    # Consistency across seeds (Carlini's clique, MemBench's fraction) in the copy-detection space.
    if ok:
        emb = np.stack([np.asarray(r[column], dtype=np.float32) for r in ok])
        members = largest_cluster(emb, t.cluster_similarity)
        if members.sum() < 2:  # a lone image is not a cluster
            members[:] = False
        consistency = float(members.mean())
    else:
        members, consistency = np.zeros(0, bool), 0.0
    member_of = {r["unit_id"]: bool(m) for r, m in zip(ok, members)}
    norms = [r["noise_norm"] for r in ok if r.get("noise_norm") is not None]
    mean_norm = float(np.mean(norms)) if norms else None
    memorized_prompt = (len(ok) > 1 and consistency >= t.consistency) or (
        t.noise_norm is not None and mean_norm is not None and mean_norm >= t.noise_norm
    )
    # Share of the prompt's seeds in which each implied element is shown.
    implicit_share: dict[str, float] = defaultdict(float)
    presence_of: dict[str, list[dict]] = {}
    for r in ok:
        elements = element_presence(r.get("probes"), r["entity"])
        for e in elements:
            e["present"] = e["presence"] >= t.element_presence
            if e["kind"] == "implicit" and e["present"]:
                implicit_share[e["element"]] += 1.0 / len(ok)
        presence_of[r["unit_id"]] = elements
    bg = background.get(space)
    out = []
    for r in rows:
        base = {
            "scan_id": r["scan_id"],
            "unit_id": r["unit_id"],
            "prompt_id": r["prompt_id"],
            "entity": r["entity"],
            "seed": r["seed"],
            "status": r["status"],
            "consistency": consistency,
            "memorized_prompt": memorized_prompt,
            "noise_norm": r.get("noise_norm"),
            "clip_prompt_score": r.get("clip_prompt_score"),
        }
        if r["status"] != STATUS_OK:
            out.append({**base, "label": None, "flags": [], "reasons": f"not scored: {r.get('error')}", "elements": []})
            continue
        out.append(
            {
                **base,
                **_decide(
                    r,
                    neighbors.get(r["unit_id"], {}).get(space, []),
                    space,
                    bg,
                    presence_of[r["unit_id"]],
                    implicit_share,
                    member_of[r["unit_id"]],
                    t,
                ),
            }
        )
    return out


def _decide(r, nbrs, space, bg: Background | None, elements, implicit_share, cluster_member, t) -> dict:
    flags: list[str] = []
    reasons: list[str] = []
    top = nbrs[0] if nbrs else None
    R = float(top["score"]) if top else float("-inf")
    k_above = sum(1 for n in nbrs if n["score"] >= t.replication)
    bg_p95 = bg.p95 if bg else None
    replicated = top is not None and R >= t.replication and (bg_p95 is None or R > bg_p95) and k_above <= t.eidetic_k
    subtype = None
    if top is not None and R >= t.replication:
        flags.append("copy_neighbor")
    if replicated:
        subtype = "verbatim" if R >= t.verbatim else "partial"
        flags += ["replication", subtype]
        k_text = f"{k_above}" if k_above < len(nbrs) else f">={k_above}"
        bg_text = f", above the train-train background p95 {_fmt(bg_p95)}" if bg_p95 is not None else ""
        reasons.append(
            f"replication: {space.upper()} top-1 {_fmt(R)} to training image '{top['train_id']}'"
            f" (>= replication {_fmt(t.replication)}{bg_text}); {k_text} training image(s) above the copy threshold"
            f" (<= {t.eidetic_k}); {subtype} (verbatim at >= {_fmt(t.verbatim)})"
        )
    elif top is not None and R >= t.replication:
        why = (
            f"{k_above} training images above the copy threshold (> {t.eidetic_k}: a generic look, not one image)"
            if k_above > t.eidetic_k
            else f"not above the background p95 {_fmt(bg_p95)}"
        )
        reasons.append(f"no replication: {space.upper()} top-1 {_fmt(R)} but {why}")
    elif top is not None:
        reasons.append(f"no replication: {space.upper()} top-1 {_fmt(R)} < replication {_fmt(t.replication)}")

    ent_p = entity_presence(r.get("probes"), r["entity"])
    if ent_p is not None:
        rendered = ent_p >= t.element_presence
        reasons.append(f"entity '{r['entity']}' vs its class noun: P={_fmt(ent_p)}")
    else:
        score = r.get("clip_prompt_score")
        rendered = score is not None and score >= t.clip_floor
        reasons.append(f"CLIP prompt score {_fmt(score if score is not None else float('nan'))} (floor {t.clip_floor})")
    if rendered:
        flags.append("entity_rendered")

    explicit = [e for e in elements if e["kind"] == "explicit"]
    explicit_ok = all(e["present"] for e in explicit)
    for e in explicit:
        flags.append(f"explicit:{e['element']}" if e["present"] else f"explicit_missing:{e['element']}")
    implied = []
    for e in elements:
        if e["kind"] != "implicit" or not e["present"]:
            continue
        share = implicit_share.get(e["element"], 0.0)
        flags.append(f"implicit:{e['element']}")
        if share >= t.consistency:
            implied.append((e["element"], e["presence"], share))

    if replicated:
        label = "MU"
    elif implied:
        label = "MI"
        reasons.append(
            "implied element(s) shown consistently: "
            + ", ".join(f"'{a}' P={_fmt(p)} in {share:.0%} of seeds" for a, p, share in implied)
        )
    elif rendered and explicit_ok:
        label = "ME"
        if explicit:
            reasons.append(
                "explicit elements shown: " + ", ".join(f"'{e['element']}' P={_fmt(e['presence'])}" for e in explicit)
            )
    else:
        label = "none"
    if cluster_member:
        flags.append("seed_cluster")
    return {
        "label": label,
        "subtype": subtype,
        "flags": flags,
        "reasons": f"{label}: " + "; ".join(reasons),
        "replication_score": R if top is not None else None,
        "replication_train_id": top["train_id"] if top is not None else None,
        "eidetic_k": k_above,
        "background_p95": bg_p95,
        "cluster_member": cluster_member,
        "entity_presence": ent_p,
        "elements": elements,
    }
