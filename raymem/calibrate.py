"""`raymem calibrate`: fit the labeler's thresholds on a small human-labelled pilot set.

The pilot is a Parquet (or CSV/JSONL) table of `unit_id` (or `image_uri`) and `label` (MU, MI, ME or
none) for images of one complete scan. Every labeler input is read back from that scan's published
tables through `LabelInputs`, the same builder the scan itself labels from, so fitting re-runs only the
decision (never the models), and at the scan's own thresholds reproduces its labels exactly.
Thresholds are fitted one at a time, category by category in precedence order (MU, then
MI, then ME): each takes the value with the highest recall among those reaching the target precision
on the pilot, or the most precise value when none does (reported as missed). Wen et al.'s noise norm is
measured as a detector of memorized prompts (a pilot prompt with an MU image): its AUC, and the
threshold at 1 % false positives among the other pilot prompts, used when the AUC is above 0.5. A
category whose pilot images come from fewer than `MIN_FIT_PROMPTS` prompts keeps its thresholds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from raymem import uri as uris
from raymem.config import ThresholdsConfig
from raymem.errors import InputError
from raymem.label import label_units
from raymem.label_inputs import LabelInputs
from raymem.prompts import read_records
from raymem.schema import LABELS
from raymem.stats import clopper_pearson

# Candidate values per threshold, and which category each one is fitted for (in precedence order).
GRID = {
    "replication": [round(x, 2) for x in np.arange(0.30, 0.96, 0.05)],
    # scans without a copy detector: CLIP image-image cosines of copies sit near 1
    "clip_replication": [round(x, 2) for x in np.arange(0.80, 1.0, 0.01)],
    "pixel_l2": [0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20],
    "region_l2": [0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15],
    "region_tiles": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 4096],  # 4096 (REGION_OFF): none at all
    "region_breadth": [1, 2, 3, 5, 10],
    "consistency": [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
    "element_presence": [round(x, 2) for x in np.arange(0.30, 0.91, 0.05)],
    # A level, so at most 0.1: beyond it the test passes that share of images the null explains (a
    # pilot of a few prompts once fitted 0.5, calling half of the never-shown names rendered).
    "entity_alpha": [0.001, 0.005, 0.01, 0.02, 0.05, 0.1],
}
REGION_OFF = 4096  # more tiles than the largest grid has (64 x 64)
# A category's thresholds are fitted only from pilot images of at least this many prompts. A prompt's
# images share its prompt, so one prompt is one observation of how the category looks: fitted to one MI
# prompt whose element showed in all 8 seeds, `consistency` went to 1.0 and a held-out planted world had
# no MI left (docs/planted.md, "World 28").
MIN_FIT_PROMPTS = 3
FIT_ORDER = (
    ("MU", ("replication", "pixel_l2", "region_l2", "region_tiles", "region_breadth")),
    ("MI", ("consistency", "element_presence")),
    # the entity test's own level: null_alpha also decides MI's implied elements, which ME's pilot
    # images say nothing about (a shared level fitted for ME switched MI off on a held-out world)
    ("ME", ("entity_alpha",)),
)


def read_pilot(source: str, inputs: LabelInputs) -> dict[str, str]:
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
    by_image = {g["image_uri"]: g["unit_id"] for g in inputs.generations if g.get("image_uri")}
    scan_units = set(inputs.scored_scan_units())
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
    """Per category: pilot images (`n`) and the prompts they come from, predicted, correct, precision
    and recall."""
    predicted = {r["unit_id"]: r["label"] for r in labels if r["unit_id"] in pilot}
    prompt_of = {r["unit_id"]: r.get("prompt_id") for r in labels if r["unit_id"] in pilot}
    out = {}
    for category in LABELS:
        tp = sum(1 for u, h in pilot.items() if h == category and predicted.get(u) == category)
        n_pred = sum(1 for u in pilot if predicted.get(u) == category)
        n_true = sum(1 for h in pilot.values() if h == category)
        out[category] = {
            "n": n_true,
            "prompts": len({prompt_of.get(u) for u, h in pilot.items() if h == category}),
            "predicted": n_pred,
            "correct": tp,
            "precision": tp / n_pred if n_pred else None,
            "recall": tp / n_true if n_true else None,
        }
    return out


def reaches_target(pr: dict, target: float) -> bool:
    """Whether a category's precision on the pilot (its point estimate) reaches the target."""
    return pr["precision"] is not None and pr["precision"] >= target


def precision_interval(pr: dict) -> tuple[float, float] | None:
    """Exact 95 % interval of a category's precision on the pilot (images as if independent: a pilot of
    few prompts is less sure than this says)."""
    return clopper_pearson(pr["correct"], pr["predicted"])


def unproven(after: dict, target: float) -> dict[str, str]:
    """{category: why}, for categories whose fitted precision reaches the target on the pilot while its
    interval's low end does not: the pilot is too small to show the target was met."""
    out = {}
    for category, pr in after.items():
        interval = precision_interval(pr)
        if reaches_target(pr, target) and interval and interval[0] < target:
            out[category] = (
                f"precision {pr['correct']}/{pr['predicted']}, 95 % interval [{interval[0]:.2f}, {interval[1]:.2f}], "
                f"from {pr['prompts']} prompt(s)"
            )
    return out


def _with(t: ThresholdsConfig, name: str, value: float) -> ThresholdsConfig:
    update = {name: value}
    if name == "replication" and value > t.verbatim:
        update["verbatim"] = value
    return t.model_copy(update=update)


def _candidates(name: str, ev: LabelInputs, pilot: dict[str, str]) -> list[float]:
    """The grid, plus for replication every pilot image's top-1 score (the optimum sits on one of them)."""
    values = set(GRID[name])
    if name in ("replication", "clip_replication"):
        for uid in pilot:
            nbrs = ev.neighbors.get(uid, {}).get(ev.copy_space) or []
            if nbrs:
                values.add(float(nbrs[0]["score"]))
    return sorted(values)


def fit_order(inputs: LabelInputs) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """FIT_ORDER, with CLIP's own replication threshold when the scan had no copy detector."""
    if inputs.copy_space == "sscd":
        return FIT_ORDER
    return tuple((c, tuple("clip_replication" if n == "replication" else n for n in names)) for c, names in FIT_ORDER)


def _score(pr: dict, target: float) -> tuple:
    """Order of preference: precision at the target first, then recall (or precision below it)."""
    p, r = pr["precision"] or 0.0, pr["recall"] or 0.0
    if reaches_target(pr, target):
        return (True, r, p)
    return (False, p, r)


def too_few_prompts(inputs: LabelInputs, pilot: dict[str, str], min_prompts: int) -> dict[str, str]:
    """{category: why}, for the categories the pilot has images of, but from fewer than `min_prompts`
    prompts: their thresholds are not fitted."""
    prompt_of = {g["unit_id"]: g["parent_prompt_id"] for g in inputs.generations}
    out = {}
    for category, _ in FIT_ORDER:
        prompts = len({prompt_of.get(u) for u, h in pilot.items() if h == category})
        if 0 < prompts < min_prompts:
            out[category] = f"{prompts} pilot prompt(s) of it, fewer than {min_prompts}"
    return out


def fit(
    inputs: LabelInputs,
    pilot: dict[str, str],
    start: ThresholdsConfig,
    target: float,
    min_prompts: int = MIN_FIT_PROMPTS,
):
    """Coordinate-wise fit; returns (fitted thresholds, {category: met target?}) for the categories the
    pilot has images of from at least `min_prompts` prompts; the others keep their thresholds."""
    prompts = {g["parent_prompt_id"] for g in inputs.generations if g["unit_id"] in pilot}
    ev = inputs.restricted(prompts)
    t = start
    met = {}
    unfitted = too_few_prompts(inputs, pilot, min_prompts)
    for category, names in fit_order(inputs):
        if category in unfitted or not any(h == category for h in pilot.values()):
            continue
        for name in names:
            # Whole-image copies are fitted with region copies off: an image that is no longer a copy
            # at a stricter `replication` must not count as a region copy before the region thresholds
            # are fitted in turn. A value replaces the current one only when it does strictly better.
            off = {"region_tiles": REGION_OFF} if category == "MU" and not name.startswith("region_") else {}
            best_value = getattr(t, name)
            best_key = _score(precision_recall(label_units(ev, t.model_copy(update=off)), pilot)[category], target)
            for value in _candidates(name, ev, pilot):
                trial = _with(t, name, value).model_copy(update=off)
                key = _score(precision_recall(label_units(ev, trial), pilot)[category], target)
                if key > best_key:
                    best_key, best_value = key, value
            t = _with(t, name, best_value)
        met[category] = reaches_target(precision_recall(label_units(ev, t), pilot)[category], target)
    return t, met


def report(before: dict, after: dict) -> str:
    def f(x):
        return "  -  " if x is None else f"{x:5.2f}"

    def interval(pr):
        bounds = precision_interval(pr)
        return "" if bounds is None else f"[{bounds[0]:.2f}, {bounds[1]:.2f}]"

    lines = ["category  n_human  prompts  precision  recall   ->  precision  recall   precision 95 %"]
    for c in LABELS:
        b, a = before[c], after[c]
        lines.append(
            f"{c:8s}  {b['n']:7d}  {b['prompts']:7d}  {f(b['precision'])}      {f(b['recall'])}    ->  "
            f"{f(a['precision'])}      {f(a['recall'])}   {interval(a)}"
        )
    return "\n".join(lines)


def thresholds_yaml(t: ThresholdsConfig) -> str:
    import yaml

    return yaml.safe_dump({"thresholds": json.loads(t.model_dump_json())}, sort_keys=False)


@dataclass(frozen=True)
class NoiseNormFit:
    """Wen et al.'s text-noise norm as a detector of memorized prompts, measured on the pilot: a prompt
    is memorized when any of its pilot images is MU. AUC = P(a memorized prompt's mean norm > a
    non-memorized one's); the threshold is the smallest value that at most `false_positive_rate` of the
    non-memorized pilot prompts reach (null when the pilot has no non-memorized prompt with a norm)."""

    memorized_prompts: int
    other_prompts: int
    auc: float | None
    threshold: float | None
    false_positive_rate: float


def fit_noise_norm(inputs: LabelInputs, pilot: dict[str, str], false_positive_rate: float = 0.01) -> NoiseNormFit:
    norms: dict[str, list[float]] = {}
    memorized: dict[str, bool] = {}
    for g in inputs.generations:
        uid, prompt = g["unit_id"], g["parent_prompt_id"]
        if uid not in pilot:
            continue
        memorized[prompt] = memorized.get(prompt, False) or pilot[uid] == "MU"
        if g.get("noise_norm") is not None and np.isfinite(g["noise_norm"]):
            norms.setdefault(prompt, []).append(float(g["noise_norm"]))
    mean = {p: float(np.mean(v)) for p, v in norms.items()}
    pos = np.array([v for p, v in mean.items() if memorized[p]])
    neg = np.array([v for p, v in mean.items() if not memorized[p]])
    auc = None
    if len(pos) and len(neg):  # Mann-Whitney: ties count half
        auc = float(
            ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
        )
    threshold = None
    if len(neg):
        # the smallest threshold with at most false_positive_rate of the other prompts at or above it
        allowed = int(np.floor(false_positive_rate * len(neg)))
        ordered = np.sort(neg)[::-1]
        threshold = float(np.nextafter(ordered[allowed], np.inf))
    return NoiseNormFit(len(pos), len(neg), auc, threshold, false_positive_rate)


@dataclass
class Calibration:
    scan_id: str
    pilot_size: int
    target_precision: float
    before: dict
    after: dict
    fitted: ThresholdsConfig
    met: dict[str, bool]
    noise_norm: NoiseNormFit | None = None
    not_fitted: dict[str, str] = field(default_factory=dict)  # category: why its thresholds were kept


def calibrate(
    root: str,
    scan_id: str,
    pilot_source: str,
    start: ThresholdsConfig,
    target: float,
    min_prompts: int | None = None,
) -> Calibration:
    """`raymem calibrate`: read the scan back, read the pilot, fit, and measure before and after."""
    min_prompts = MIN_FIT_PROMPTS if min_prompts is None else min_prompts
    inputs = LabelInputs.read(root, scan_id)
    pilot = read_pilot(pilot_source, inputs)
    before = precision_recall(label_units(inputs, start), pilot)
    fitted, met = fit(inputs, pilot, start, target, min_prompts)
    noise = fit_noise_norm(inputs, pilot)
    if noise.threshold is not None and noise.auc is not None and noise.auc > 0.5:
        # an uninformative norm (AUC <= 0.5) is not used: it would only flag prompts at random
        fitted = fitted.model_copy(update={"noise_norm": noise.threshold})
    after = precision_recall(label_units(inputs, fitted), pilot)
    unfitted = too_few_prompts(inputs, pilot, min_prompts)
    return Calibration(scan_id, len(pilot), target, before, after, fitted, met, noise, unfitted)
