"""The reducer: counts and rates of MU / MI / ME / none per prompt and per entity.

Rates are over *scored* units (failed units are counted apart, in n_failed), so a flaky worker shows
up as failures rather than as a drop in memorization.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from raymem.label import RENDERED_SHARE
from raymem.schema import LABELS, STATUS_OK
from raymem.stats import clopper_pearson

# An entity with fewer training images than this is "under-represented" (MIMETIC2: 200-600 images
# before a model imitates a concept reliably).
UNDER_REPRESENTED = 200


def _counts(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["status"] == STATUS_OK]
    out = {"n_units": len(rows), "n_scored": len(scored), "n_failed": len(rows) - len(scored)}
    for label in LABELS:
        n = sum(1 for r in scored if r["label"] == label)
        out[f"n_{label}"] = n
        out[f"rate_{label}"] = n / len(scored) if scored else None
    # Every category an image shows, not only its primary label, and how they co-occur.
    shows = {c: [bool(r.get(f"is_{c}")) for r in scored] for c in ("MU", "MI", "ME")}
    for c, flags in shows.items():
        out[f"n_any_{c}"] = sum(flags)
        out[f"rate_any_{c}"] = sum(flags) / len(scored) if scored else None
    for a, b in (("ME", "MU"), ("MI", "MU"), ("ME", "MI")):
        out[f"n_{a}_and_{b}"] = sum(x and y for x, y in zip(shows[a], shows[b]))
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def prompt_tallies(labels: list[dict]) -> list[dict]:
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in labels:
        by_prompt[r["prompt_id"]].append(r)
    out = []
    for prompt_id in sorted(by_prompt):
        rows = by_prompt[prompt_id]
        scores = [r.get("replication_score") for r in rows if r["status"] == STATUS_OK]
        out.append(
            {
                "scan_id": rows[0]["scan_id"],
                "prompt_id": prompt_id,
                "entity": rows[0]["entity"],
                **_counts(rows),
                "consistency": rows[0]["consistency"],
                "mean_noise_norm": _mean(r.get("noise_norm") for r in rows),
                "max_replication_score": max((s for s in scores if s is not None), default=None),
                "memorized_prompt": bool(rows[0]["memorized_prompt"]),
            }
        )
    return out


def _renders_entity(label: dict) -> bool:
    """Whether the labeler found the image renders its prompt's entity (its `entity_rendered` flag)."""
    return "entity_rendered" in (label.get("flags") or ())


def entity_tallies(labels: list[dict], train_frequency: dict[str, int]) -> list[dict]:
    """Per entity. Under-memorization is measured: `render_rate` is the share of its scored images that
    render it (the labeler's null-calibrated test), and `entity_not_rendered` says it is below one half;
    `train_frequency` beside it shows whether the training set is why (MIMETIC2: 200-600 images before a
    model imitates a concept reliably; `UNDER_REPRESENTED`)."""
    by_entity: dict[str, list[dict]] = defaultdict(list)
    for r in labels:
        by_entity[r["entity"]].append(r)
    out = []
    for entity in sorted(by_entity):
        rows = by_entity[entity]
        counts = _counts(rows)
        freq = train_frequency.get(entity)
        scored = [r for r in rows if r["status"] == STATUS_OK]
        presence = _mean(r.get("entity_presence") for r in scored)
        render_rate = _mean(1.0 if _renders_entity(r) else 0.0 for r in scored)
        out.append(
            {
                "scan_id": rows[0]["scan_id"],
                "entity": entity,
                "n_prompts": len({r["prompt_id"] for r in rows}),
                **counts,
                "n_memorized_prompts": len({r["prompt_id"] for r in rows if r["memorized_prompt"]}),
                "train_frequency": freq,
                "mean_entity_presence": presence,
                "render_rate": render_rate,
                "entity_not_rendered": bool(render_rate is not None and render_rate < RENDERED_SHARE),
                "under_represented": None if freq is None else freq < UNDER_REPRESENTED,
            }
        )
    return out


def implied_control_rate(labels: list[dict], null_alpha: float, needs_entity: bool = False) -> dict | None:
    """The MI rule's false-positive rate measured on this scan: of the control probes (implied elements
    of other entities, one test per prompt and element), the share that would make an image MI -- beyond
    the null at `null_alpha`, and with `needs_entity` (thresholds.mi_needs_entity) on a prompt whose entity
    the model renders (in at least RENDERED_SHARE of its scored images) -- with an exact 95 % interval;
    `beyond_null` counts the test alone. None when the scan asked none (no implied elements, or no class
    nouns)."""
    beyond: dict[tuple[str, str], bool] = {}
    rendered: dict[str, list[bool]] = defaultdict(list)
    for r in labels:
        if r.get("status", STATUS_OK) == STATUS_OK:
            rendered[r["prompt_id"]].append(_renders_entity(r))
        for e in r.get("elements") or ():
            if e["kind"] == "control" and e.get("prompt_p") is not None:
                beyond[(r["prompt_id"], e["element"])] = e["prompt_p"] <= null_alpha
    if not beyond:
        return None
    passed = {
        key: b and (not needs_entity or (bool(rendered[key[0]]) and float(np.mean(rendered[key[0]])) >= RENDERED_SHARE))
        for key, b in beyond.items()
    }
    k, n = sum(passed.values()), len(passed)
    return {
        "probes": n,
        "beyond_null": sum(beyond.values()),
        "passed": k,
        "rate": k / n,
        "interval": list(clopper_pearson(k, n)),
        "null_alpha": null_alpha,
        "prompts": len({prompt for prompt, _ in beyond}),
    }


def mi_unspecific(controls: dict) -> bool:
    """Whether the MI rule passed controls more often than its level allows (the interval's low end above it)."""
    return controls["interval"][0] > controls["null_alpha"]


def describe_controls(controls: dict) -> str:
    """`implied_control_rate`'s result in one line, for the log and the scan's summary."""
    low, high = controls["interval"]
    verdict = "MI is not specific on this model and CLIP" if mi_unspecific(controls) else "within the test's level"
    passed = controls.get("passed", controls["beyond_null"])  # manifests before the entity gate: the test alone
    gated = controls["beyond_null"] - passed
    where = f"; {gated} more beyond the null where the entity is not rendered" if gated else ""
    return (
        f"{passed} of {controls['probes']} other entities' implied elements pass the MI test "
        f"({controls['rate']:.0%}, 95 % interval {low:.0%}-{high:.0%}; level {controls['null_alpha']}{where}): "
        + verdict
    )
