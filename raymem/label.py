"""The labeler: every generated image gets MU, MI, ME or none, with every flag and the numbers behind it.

Primary label by precedence MU > MI > ME > none (docs/labeler.md has the sources of every rule):

  MU  (a) replication: top-1 copy-detection (SSCD) similarity R >= `replication`, R above the
          train-train background p95 or the copy confirmed pixel by pixel (tiled l2 <= `pixel_l2` and
          below the pixel background p5: raymem.pixels), and at most `eidetic_k` training images above
          `replication` (one image was copied, not a common look). Subtype: `verbatim` when R >=
          `verbatim` or the copy is pixel-confirmed; `template` when only part of the tiles match
          (Webster's TV); else `partial`. Webster's MV/RV: the copied image's caption is / is not the
          prompt. A copy of the very work the prompt asks for (`requests_work`, and the copied image
          is tagged with the entity or captioned with the prompt) is what the user expected: ME,
          subtype `requested_copy` -- unless it also shows an instance element (b).
      (r) region (off unless `signals.region_neighbours` > 0): no whole-image copy, but >=
          `region_tiles` textured tiles of one of the image's nearest training images are reproduced
          at the same position (tile l2 <= `region_l2`, both tiles' pixel std >= `region_texture`;
          raymem.regions), and more tiles than the region background p99 (what sampled training
          images share with their own nearest training images) -- a copied background, watermark or
          mark. Not MU when that training image is the work the prompt names (`requested_region`).
      (d) duplicated patch (with region detection on): no whole-image or region copy, but >= `region_tiles`
          textured tiles reproduced that two distinct compared training images carry as the same pixels
          (their measured pair within `region_duplicate_l2`) -- a watermark, a logo, a reused backdrop
          the training set repeats; tiles compared within `region_l2` scaled by their texture
          (raymem.regions.scaled_bound). Not MU when those images are the work the prompt names.
      (m) private mark (with region detection on, prompts that request a work): >= `region_tiles` tiles
          copied from one copy of the requested work where more than half of the compared copies of the
          work (a sample of its tagged training images, `signals.work_copies`) provably differ --
          content of one print (a signature, a stamp), not the work. Subtype `private_mark`; the
          requested copy stays in `is_ME` (raymem.regions.private_mark).
      (b) instance element: an unprompted element that the training captions tie to fewer than
          `instance_support` images of the entity (and to no other image) is shown -- only when the
          prompt has null images, and only past the corrected tests below.
  MI  an implied element (listed in the prompt set, or mined from captions with lift >= `min_lift`
      and support >= `min_support`) is shown in this image and in >= `consistency` of the seeds.
  ME  the entity is rendered and every explicit element is shown, with no replication.

"Shown" is CLIP zero-shot (two-way softmax P >= `element_presence`), and for the entity and for
unprompted elements also beyond the prompt's null images (entity replaced by its class noun, same
seeds), by small-sample tests at level `null_alpha` (the entity's at `entity_alpha`, when set;
raymem.stats): the prompt's images against the null images seed for seed (paired t; Benjamini-Hochberg
across the prompt's implied elements, and across its instance elements), and one image against the null
images (t prediction interval; BH across the image's elements). The entity needs both; implied elements
the prompt's; instance elements both. Without null images the entity gets the zero-shot test alone ("uncalibrated"), and
implied and instance elements are never shown (zero-shot alone fires on elements an entity never
shows: docs/planted.md, negative probes). On scan and null images drawn from one distribution (tests/test_label.py),
3-5 % of images get any label and none MU; the z-test this replaced labelled 40 % MU.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from raymem.config import MIN_PIXEL_BACKGROUND, ThresholdsConfig
from raymem.duplicates import groups
from raymem.label_inputs import Background, EntityStats, LabelInputs, PromptContext
from raymem.pixels import PixelEvidence, PixelPair
from raymem.pixels import background_p5 as pixel_background_p5
from raymem.probes import LOGIT_SCALE, sigmoid, two_way_logit
from raymem.regions import (
    DuplicatedPatch,
    PrivateMark,
    RegionEvidence,
    RegionMatch,
    background_p99,
    duplicated_patch,
    neighbours_to_compare,
    pair_index,
    private_mark,
    region_match,
)
from raymem.schema import ROLE_NULL, ROLE_SCAN, STATUS_OK
from raymem.stats import TestResult, bh_adjusted, paired_p, prediction_p

__all__ = [
    "Background",
    "EntityStats",
    "LabelInputs",
    "PromptContext",
    "label_units",
    "pixel_check_pairs",
    "region_check_pairs",
    "copy_thresholds",
    "CopyEvidence",
    "replication_evidence",
]


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
    return component == labels[np.argmax(counts)]


def _normalize_text(text: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", " ", (text or "").lower()).strip()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


class _Logits:
    """Zero-shot logits of the prompt's probes for one image, from CLIP cosines."""

    def __init__(self, ctx: PromptContext, texts: dict[str, np.ndarray], image: np.ndarray):
        self.score = {(p.kind, p.element): float(texts[p.text] @ image) for p in ctx.probes if p.text in texts}
        self.entity = ctx.entity

    def _class_score(self) -> float | None:
        """The cosine with "a photo of c" (the prompt's class noun), None without one."""
        return next((s for (kind, _), s in self.score.items() if kind == "entity_null"), None)

    def entity_logit(self) -> float | None:
        null, base = self._class_score(), self.score.get(("entity", self.entity))
        return two_way_logit(base, null) if null is not None and base is not None else None

    def placebo_name_logits(self) -> dict[str, float]:
        """Each made-up name's logit against the class text, as the entity's own ("n" against "c")."""
        null = self._class_score()
        if null is None:
            return {}
        return {name: two_way_logit(s, null) for (kind, name), s in self.score.items() if kind == "placebo_name"}

    def element_logits(self) -> dict[tuple[str, str], float]:
        null = self._class_score()
        base = null if null is not None else self.score.get(("entity", self.entity))
        if base is None:
            return {}
        return {
            (kind, element): two_way_logit(s, base)
            for (kind, element), s in self.score.items()
            if kind in ("explicit", "implicit", "mined", "instance", "placebo", "control")
        }


def _beyond_placebo(ctx: PromptContext) -> str:
    placebos = sum(1 for p in ctx.probes if p.kind == "placebo")
    return f" (beyond all {placebos} placebo elements)" if placebos else ""


def _has_reference(ctx: PromptContext) -> bool:
    return ctx.reference is not None and ctx.reference.centroid is not None


def _names_copied_work(ctx: PromptContext, top: dict | None) -> str:
    """Why the copied training image is the work the prompt asks for ('' when it is not): the prompt
    set says the prompt requests a work (`requests_work`), and the copied image is that work -- tagged
    with the prompt's entity, or captioned with the prompt itself."""
    if not ctx.requests_work or top is None:
        return ""
    if ctx.entity in (top.get("entities") or ()):
        return f"the prompt asks for the work '{ctx.entity}' and the copied training image is tagged with it"
    if _normalize_text(top.get("caption")) == _normalize_text(ctx.prompt):
        return f"the prompt asks for the work '{ctx.entity}' and the copied training image's caption is the prompt"
    return ""


def _unseen(ctx: PromptContext) -> bool:
    return ctx.reference is not None and ctx.reference.count == 0


def _entity_score(ctx: PromptContext, logits: _Logits, image: np.ndarray) -> float | None:
    """How much the image shows the entity: cosine to the centroid of its training images (paper-spec
    F_i), scaled like a logit; without tagged training images (none in the table, or no tags at all),
    the text probe 'e' against 'c' -- measured like any other entity, never assumed unrendered."""
    if _has_reference(ctx):
        return float(LOGIT_SCALE * (image @ ctx.reference.centroid))
    return logits.entity_logit()


def label_units(inputs: LabelInputs, thresholds: ThresholdsConfig) -> list[dict]:
    """One label row per scan generation row (null rows only calibrate; failed rows get no label)."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(inputs.generations):
        by_prompt[g.get("parent_prompt_id") or g["prompt_id"]].append(i)
    # what distinct training images share region by region: once per decision, not per prompt
    region_bg = background_p99(
        inputs.region_background, thresholds.region_l2, thresholds.region_texture, thresholds.region_duplicate_l2
    )
    space = inputs.copy_space
    copy_bg = inputs.background.get(space)
    pixel_bg = pixel_background_p5(
        inputs.pixel_background, near_duplicate_link(space, thresholds, copy_bg.p95 if copy_bg else None)
    )
    region_pairs = pair_index(inputs.region_pairs)
    out = []
    for prompt_id, rows in by_prompt.items():
        out += _label_prompt(inputs.contexts[prompt_id], rows, inputs, thresholds, region_bg, pixel_bg, region_pairs)
    return out


def _beats_names(ev: dict) -> bool:
    rival = ev.get("entity_placebo")
    return rival is None or rival["beaten"]


def _names_text(ev: dict) -> str:
    rival = ev.get("entity_placebo")
    if rival is None:
        return ""
    if rival["beaten"]:
        return f", beyond all {rival['count']} placebo names"
    return (
        f", but not beyond the placebo name '{rival['name']}' ({rival['why']}): "
        "a name the embedder never learned does as much"
    )


def _pixel_bg_text(pixel_bg: float | None) -> str:
    if pixel_bg is None:
        return f"; no pixel background (none sampled, or fewer than {MIN_PIXEL_BACKGROUND} readable distinct pairs)"
    return f"; pixel background p5 {_fmt(pixel_bg)}"


def near_duplicate_link(space: str, t: ThresholdsConfig, bg_p95: float | None) -> float | None:
    """The copy-space cosine at which two training images are one image (near-duplicates), never below
    what distinct training images reach (the background p95)."""
    link = t.near_duplicate if space == "sscd" else t.clip_replication
    return max(link, bg_p95) if link is not None and bg_p95 is not None else link


def copy_thresholds(space: str, t: ThresholdsConfig) -> tuple[float | None, float | None, float | None]:
    """(replication, verbatim, seed-cluster link) cosines in the copy space. SSCD has published values;
    CLIP has none, so without a copy detector replication is tested only at a calibrated
    `clip_replication` (verbatim then only by pixels), and never at SSCD's numbers."""
    if space == "sscd":
        return t.replication, t.verbatim, t.cluster_similarity
    return t.clip_replication, None, t.clip_replication


def pixel_check_pairs(inputs: LabelInputs, t: ThresholdsConfig) -> dict[str, PixelPair]:
    """Scan images whose nearest copy-space neighbour passes the replication threshold: the pairs to
    confirm pixel by pixel, {unit_id: (generated image uri, train_id, training image uri, score)}."""
    space = inputs.copy_space
    threshold = copy_thresholds(space, t)[0]
    pairs = {}
    if threshold is None:
        return pairs
    for g in inputs.generations:
        nbrs = inputs.neighbors.get(g["unit_id"], {}).get(space) or []
        if g["role"] == ROLE_SCAN and nbrs and nbrs[0]["score"] >= threshold and g["image_uri"]:
            pairs[g["unit_id"]] = PixelPair(
                g["image_uri"], nbrs[0]["train_id"], nbrs[0].get("image_uri"), float(nbrs[0]["score"])
            )
    return pairs


def region_check_pairs(inputs: LabelInputs, neighbours: int) -> dict[str, tuple[str, list[tuple[str, str | None]]]]:
    """Every scored scan image and its nearest training images (the top `neighbours` in the copy space
    and in CLIP space, whatever their score): the pairs to compare region by region,
    {unit_id: (generated image uri, [(train_id, training image uri), ...])}."""
    pairs = {}
    if neighbours <= 0:
        return pairs
    spaces = dict.fromkeys((inputs.copy_space, "clip"))
    for g in inputs.generations:
        if g["role"] != ROLE_SCAN or g["status"] != STATUS_OK or not g["image_uri"]:
            continue
        compare = neighbours_to_compare(inputs.neighbors.get(g["unit_id"], {}), spaces, neighbours)
        if compare:
            pairs[g["unit_id"]] = (g["image_uri"], compare)
    return pairs


def with_work_copies(
    inputs: LabelInputs, unit_pairs: dict[str, tuple[str, list[tuple[str, str | None]]]]
) -> dict[str, tuple[str, list[tuple[str, str | None]]]]:
    """`region_check_pairs` with every image of a prompt that requests a work also compared with the
    work's sampled copies (`EntityStats.work_copies`): what the private-mark check measures against."""
    out = dict(unit_pairs)
    for g in inputs.generations:
        uid = g["unit_id"]
        ctx = inputs.contexts.get(g.get("parent_prompt_id") or g["prompt_id"])
        if uid not in out or ctx is None or not ctx.requests_work or ctx.reference is None:
            continue
        uri, compared = out[uid]
        seen = {t for t, _ in compared}
        out[uid] = (uri, compared + [c for c in ctx.reference.work_copies if c[0] not in seen])
    return out


def _work_ids(ctx: PromptContext, rows_by_id: dict[str, dict]) -> set[str]:
    """The training images of the work a prompt requests among those compared with its image: the sampled
    copies, and the neighbours that are the work (`_names_copied_work`)."""
    ids = {t for t, _ in ctx.reference.work_copies} if ctx.reference is not None else set()
    return ids | {t for t, row in rows_by_id.items() if _names_copied_work(ctx, row)}


def _label_prompt(
    ctx: PromptContext,
    indices: list[int],
    inputs: LabelInputs,
    t: ThresholdsConfig,
    region_bg: float | None = None,
    pixel_bg: float | None = None,
    region_pairs: dict[tuple[str, str], RegionEvidence] | None = None,
) -> list[dict]:
    gens = inputs.generations
    texts, neighbors, background, pixels = inputs.texts, inputs.neighbors, inputs.background, inputs.pixels
    scan = [i for i in indices if gens[i].get("role", ROLE_SCAN) != ROLE_NULL]
    ok = [i for i in scan if gens[i]["status"] == STATUS_OK]
    nulls = [i for i in indices if gens[i].get("role") == ROLE_NULL and gens[i]["status"] == STATUS_OK]
    space = inputs.copy_space
    link = copy_thresholds(space, t)[2]

    # Consistency across seeds (Carlini's clique, MemBench's fraction) in the copy-detection space
    # (not measured in CLIP space unless `clip_replication` is calibrated).
    members = np.zeros(len(ok), dtype=bool)
    if len(ok) > 1 and link is not None:
        members = largest_cluster(np.stack([inputs.embedding(space, i) for i in ok]), link)
        if members.sum() < 2:
            members[:] = False
    consistency = (float(members.mean()) if len(ok) else 0.0) if link is not None else None
    member_of = {i: bool(m) for i, m in zip(ok, members)}
    norms = [gens[i]["noise_norm"] for i in ok if gens[i].get("noise_norm") is not None]
    mean_norm = float(np.mean(norms)) if norms else None
    memorized_prompt = bool(
        (len(ok) > 1 and consistency is not None and consistency >= t.consistency)
        or (t.noise_norm is not None and mean_norm is not None and mean_norm >= t.noise_norm)
    )

    # Null calibration: the same logits on images of the prompt with the entity replaced by its class,
    # which share the scan images' seeds (raymem.stats: small-sample tests, paired by seed).
    seed_of = {i: gens[i]["seed"] for i in (*ok, *nulls)}
    logits = {i: _Logits(ctx, texts, inputs.clip[i]) for i in (*ok, *nulls)}
    entity = {i: _entity_score(ctx, logits[i], inputs.clip[i]) for i in (*ok, *nulls)}
    elements = {i: logits[i].element_logits() for i in (*ok, *nulls)}
    null = _Null(
        entity={seed_of[i]: entity[i] for i in nulls if entity[i] is not None},
        elements={
            key: {seed_of[i]: elements[i][key] for i in nulls if key in elements[i]}
            for key in {k for i in nulls for k in elements[i]}
        },
    )
    # Prompt level: are the prompt's images beyond their null images, seed for seed? The entity alone,
    # and every unprompted element with Benjamini-Hochberg across the prompt's elements of one kind
    # group (implied; instance).
    entity_test = paired_p({seed_of[i]: entity[i] for i in ok if entity[i] is not None}, null.entity)
    # An entity judged by its text probe must also beat every made-up name (probes.PLACEBO_NAMES): the
    # prompt's paired shift over the null, and this image's logit (scans before the placebo names have none)
    names = {i: logits[i].placebo_name_logits() for i in (*ok, *nulls)} if not _has_reference(ctx) else {}
    name_effects = {
        name: paired_p({seed_of[i]: names[i][name] for i in ok}, {seed_of[i]: names[i][name] for i in nulls})
        for name in {n for i in ok for n in names.get(i, {})}
    }
    prompt_tests: dict[tuple[str, str], TestResult | None] = {}
    for key, values in null.elements.items():
        if key[0] != "explicit":
            prompt_tests[key] = paired_p({seed_of[i]: elements[i][key] for i in ok if key in elements[i]}, values)
    prompt_p = _bh_per_group(prompt_tests)

    evidence = {
        i: _image_evidence(ctx, entity[i], elements[i], null, entity_test, prompt_tests, prompt_p, t)
        | {"entity_placebo": _rival_name(entity[i], entity_test, names.get(i, {}), name_effects)}
        for i in ok
    }
    # MI is an element the named entity implies: where the model renders the entity in fewer than half of
    # the prompt's images, an element beyond the null may be the prompt's images differing from their null
    # images (a name the model does not know, an unusual image), not the entity's (`mi_needs_entity`)
    entity_decision = {i: _entity_rendered(ctx, evidence[i], gens[i], t) for i in ok}
    render_share = sum(rendered for rendered, _ in entity_decision.values()) / len(ok) if ok else 0.0
    shown_share: dict[tuple[str, str], float] = defaultdict(float)
    for ev in evidence.values():
        for e in ev["elements"]:
            if e["present"]:
                shown_share[(e["kind"], e["element"])] += 1.0 / len(ok)
    for ev in evidence.values():
        for e in ev["elements"]:
            e["share"] = shown_share.get((e["kind"], e["element"]), 0.0)

    bg = background.get(space)
    out = []
    for i in scan:
        r = gens[i]
        base = {
            "scan_id": r["scan_id"],
            "unit_id": r["unit_id"],
            "prompt_id": ctx.prompt_id,
            "entity": ctx.entity,
            "seed": r["seed"],
            "status": r["status"],
            "consistency": consistency,
            "memorized_prompt": memorized_prompt,
            "noise_norm": r.get("noise_norm"),
            "clip_prompt_score": r.get("clip_prompt_score"),
            "null_images": len(nulls),
        }
        if r["status"] != STATUS_OK:
            out.append({**base, "label": None, "flags": [], "reasons": f"not scored: {r.get('error')}", "elements": []})
            continue
        nbrs = neighbors.get(r["unit_id"], {}).get(space, [])
        copy = CopyEvidence(space, inputs.copy_evidence, inputs.missing.get(r["unit_id"]), bg)
        compared = inputs.regions.get(r["unit_id"], [])
        rows_by_id = (
            {n["train_id"]: n for sp in neighbors.get(r["unit_id"], {}).values() for n in sp} if compared else None
        )
        # A requested work's sampled copies are compared for the private-mark rule alone: the region-copy
        # and duplicated-patch rules read what the image itself is near (its neighbours), as for any prompt
        near = [ev for ev in compared if ev.train_id in rows_by_id] if ctx.requests_work and compared else compared
        regions = region_match(
            near,
            t.region_l2,
            t.region_texture,
            t.region_tiles,
            region_bg,
            region_pairs,
            t.region_duplicate_l2,
        )
        dup = (
            duplicated_patch(
                near, region_pairs or {}, t.region_l2, t.region_texture, t.region_duplicate_l2, t.region_tiles
            )
            if near
            else None
        )
        mark = (
            private_mark(compared, _work_ids(ctx, rows_by_id), t.region_l2, t.region_texture)
            if ctx.requests_work and compared
            else None
        )
        decision = _decide(
            ctx,
            r,
            nbrs,
            copy,
            evidence[i],
            member_of[i],
            pixels.get(r["unit_id"]),
            t,
            regions,
            rows_by_id,
            region_bg,
            pixel_bg,
            mark,
            dup,
            render_share=render_share,
            entity_decision=entity_decision[i],
        )
        out.append({**base, **decision})
    return out


# Elements the prompt does not ask for but the entity implies (listed or mined from captions).
IMPLIED_KINDS = ("implicit", "mined")
ELEMENT_FIELDS = (
    "element",
    "kind",
    "presence",
    "z",
    "image_p",
    "prompt_p",
    "effect",
    "present",
    "share",
    "lift",
    "support",
)


def _bh_per_group(tests: dict[tuple[str, str], TestResult | None]) -> dict[tuple[str, str], float | None]:
    """Benjamini-Hochberg adjusted p-values, separately for the implied and the instance elements (the
    families an MI and an MU(b) decision are taken over)."""
    adjusted: dict[tuple[str, str], float | None] = {}
    for group in (IMPLIED_KINDS, ("instance",)):
        adjusted |= bh_adjusted({k: (r.p if r else None) for k, r in tests.items() if k[0] in group})
    return adjusted


def _rival_name(
    ent_logit: float | None,
    entity_test: TestResult | None,
    name_logits: dict[str, float],
    name_tests: dict[str, TestResult | None],
) -> dict | None:
    """How the entity's text probe compares with the placebo names: None when none was probed (an entity
    with tagged training images is judged by their centroid instead); else `beaten` and, when not, the
    first name that moves the prompt's images (paired shift over the null) or this image as much."""
    if not name_logits or ent_logit is None:
        return None
    for name in sorted(name_logits):
        test, logit = name_tests.get(name), name_logits[name]
        if entity_test is not None and test is not None and test.effect >= entity_test.effect:
            why = f"shifts the prompt's images {test.effect:.2f} >= {entity_test.effect:.2f}"
            return {"beaten": False, "name": name, "why": why}
        if logit >= ent_logit:
            return {"beaten": False, "name": name, "why": f"logit {logit:.2f} >= {ent_logit:.2f} on this image"}
    return {"beaten": True, "count": len(name_logits)}


# An entity the model renders in fewer than this share of a prompt's (or an entity's) images is "not
# rendered": the entity tally says `entity_not_rendered`, and with `thresholds.mi_needs_entity` no implied
# element counts on that prompt.
RENDERED_SHARE = 0.5


@dataclass(frozen=True)
class _Null:
    """The prompt's null images: {seed: logit} of the entity score and of every element probe."""

    entity: dict[int, float]
    elements: dict[tuple[str, str], dict[int, float]]


def _why_not(e: dict, t: ThresholdsConfig) -> str:
    """Why an implied element did not make the image MI: not beyond the null, not shown here, or
    not in enough seeds."""
    shown = f"P={_fmt(e['presence'])}"
    if e.get("prompt_p") is None and e.get("image_p") is None:
        why = "no null images to test it against (the prompt has no class noun for a null prompt)"
    elif e.get("prompt_p") is not None and e["prompt_p"] > t.null_alpha:
        why = (
            f"not beyond the null images (paired over {e['pairs']} seeds: mean logit difference "
            f"{e['effect']:.2f}, p={e['prompt_p']:.3f} after BH > null_alpha {t.null_alpha})"
        )
    elif not e["present"]:
        why = f"not shown in this image (P < element_presence {t.element_presence})"
    else:
        why = f"shown in only {e['share']:.0%} of seeds (< consistency {t.consistency})"
    return f"'{e['element']}' {shown}: {why}"


def _image_evidence(ctx, ent_logit, element_logits, null: _Null, entity_test, prompt_tests, prompt_p, t) -> dict:
    """One image's entity and element evidence.

    The entity is rendered when the prompt's images are beyond the null seed for seed (paired t) and
    this image is beyond the null images (t prediction interval). Requested (explicit) elements are in
    the null prompt too, so only the zero-shot test applies to them. Implied elements go beyond the null
    for the prompt (paired t, BH across the prompt's implied elements) and each image shows them or not
    by the zero-shot test. Instance elements (MU) need both: the prompt (paired, BH) and this image
    (prediction, BH across the image's instance elements); without null images they are never shown.
    """
    ent_test = prediction_p(ent_logit, list(null.entity.values())) if ent_logit is not None else None
    entity_p = None
    if ent_test is not None:  # both must pass: the larger p decides (one seed pair or none: the image's)
        entity_p = max(ent_test.p, entity_test.p) if entity_test is not None else ent_test.p
    image_tests = {
        key: prediction_p(logit, list(null.elements[key].values()))
        for key, logit in element_logits.items()
        # placebos are compared with the instance element's logit directly, controls are tested per prompt
        # only: no image test of their own here
        if key[0] not in ("explicit", "placebo", "control") and key in null.elements
    }
    image_p = _bh_per_group(image_tests)
    # made-up words probed beside instance elements (scans before them have none): an instance element
    # must move the prompt's images, and this image, more than every one of them
    placebo_logits = [v for (kind, _), v in element_logits.items() if kind == "placebo"]
    placebo_effects = [r.effect for (kind, _), r in prompt_tests.items() if kind == "placebo" and r is not None]
    elements = []
    for (kind, element), logit in sorted(element_logits.items()):
        key = (kind, element)
        if kind == "placebo":
            continue
        p = sigmoid(logit)
        test, pp, ip = prompt_tests.get(key), prompt_p.get(key), image_p.get(key)
        if kind == "explicit":
            beyond_null = True
        elif kind == "control":
            # never shown: its prompt-level test as the MI rule takes it for a prompt's one implied element
            # (unadjusted) is the rule's false-positive check (`implied_control_rate`)
            beyond_null, pp = False, (test.p if test else None)
        elif kind in IMPLIED_KINDS:
            # the prompt's paired test; with fewer than two seed pairs the image's own; with no null
            # images at all, never: zero-shot alone called elements MI that the entity never shows
            # (the planted benchmark's negative probes on prompts without a class noun)
            decisive = pp if pp is not None else ip
            beyond_null = decisive is not None and decisive <= t.null_alpha
            ip = ip if pp is None else None  # recorded only when it decided
        else:  # instance: never without null images; the image's test, and the prompt's when it has one
            beyond_null = ip is not None and ip <= t.null_alpha and (pp is None or pp <= t.null_alpha)
            beyond_null = beyond_null and logit > max(placebo_logits, default=-np.inf)
            beyond_null = beyond_null and (test is None or test.effect > max(placebo_effects, default=-np.inf))
        assoc = ctx.associations.lookup(element) if ctx.associations else None
        it = image_tests.get(key)
        elements.append(
            {
                "element": element,
                "kind": kind,
                "logit": logit,
                "presence": p,
                "z": it.statistic if it and ip is not None else None,
                "image_p": ip,
                "prompt_p": pp,
                "effect": test.effect if test else None,
                "pairs": test.n if test else 0,
                "present": p >= t.element_presence and beyond_null,
                "share": 0.0,
                "lift": assoc.lift if assoc else None,
                "support": assoc.support if assoc else None,
            }
        )
    return {
        "entity_logit": ent_logit,
        "entity_z": ent_test.statistic if ent_test else None,
        "entity_p": entity_p,
        "entity_pairs": entity_test.n if entity_test else 0,
        "elements": elements,
    }


@dataclass(frozen=True)
class CopyEvidence:
    """Where an image's copy scores come from: the space, how its neighbours were found, and (two-stage)
    how many of its CLIP candidates could not be fetched."""

    space: str  # sscd | clip
    source: str  # sscd | sscd_candidates | clip
    missing: tuple[int, int] | None  # (candidates not fetched, candidates)
    background: Background | None

    def describe(self) -> str:
        if self.source == "sscd_candidates" and self.missing is not None:
            missing, total = self.missing
            return f"SSCD over {total - missing} fetched of {total} CLIP candidates"
        return self.space.upper()


@dataclass(frozen=True)
class Replication:
    """The copy rule's verdict for one image (MU (a)) and the numbers behind it."""

    threshold: float | None  # `replication` in the copy space (None: not tested)
    score: float | None  # R: the top-1 copy-space cosine
    top: dict | None  # the top-1 neighbour row
    breadth: int | None  # distinct training images (near-duplicate groups) above the threshold
    duplication: int | None  # the copied image's near-duplicate group among the neighbours
    background_p95: float | None
    pixel_l2: float | None  # the tiled pixel l2 to the top-1 image, when it was compared
    tile_share: float | None
    replicated: bool
    subtype: str | None  # verbatim | template | partial
    webster: str | None  # MV | RV | TV
    flags: list[str]
    reasons: list[str]


def replication_evidence(
    copy: CopyEvidence,
    nbrs: list[dict],
    pixel: PixelEvidence | None,
    pixel_bg: float | None,
    t: ThresholdsConfig,
    prompt: str | None,
) -> Replication:
    """MU (a) for one image from its copy-space neighbours (best first): R at or above `replication`,
    above the train-train background (or confirmed pixel by pixel), and at most `eidetic_k` distinct
    training images above the threshold."""
    flags: list[str] = []
    reasons: list[str] = []
    replication, verbatim, _ = copy_thresholds(copy.space, t)
    top = nbrs[0] if nbrs else None
    R = float(top["score"]) if top else None
    # Breadth: distinct training images above the threshold, near-duplicates of one image counted once;
    # duplication: how often the copied image is in the training set (raymem.duplicates).
    # Two training images are near-duplicates only above what distinct training images already reach
    # (the train-train background): in a world where everything looks alike to the descriptor, grouping
    # below it would merge distinct images and make a common look pass for one copied image.
    bg = copy.background
    bg_p95 = bg.p95 if bg else None
    link = near_duplicate_link(copy.space, t, bg_p95)
    k_above, duplication, grouped = groups(nbrs, replication, link) if replication is not None else (None, None, True)
    pixel_max = pixel.max_l2 if pixel and top and pixel.train_id == top["train_id"] else None
    tile_share = pixel.share_within(t.pixel_l2) if pixel_max is not None else None
    pixel_close = pixel_max is not None and pixel_max <= t.pixel_l2
    # ... and closer than distinct training images come to each other (smooth scenes pass pixel_l2 alone)
    pixel_copy = pixel_close and (pixel_bg is None or pixel_max < pixel_bg)
    # Above the background -- or confirmed pixel by pixel (Carlini's test), closer than distinct images come.
    distinct = bg_p95 is None or R is None or R > bg_p95 or pixel_copy
    passes = R is not None and replication is not None and R >= replication
    replicated = passes and distinct and k_above <= t.eidetic_k
    subtype = webster = None
    space = copy.describe()
    if copy.missing is not None and copy.missing[0]:
        flags.append("candidates_missing")
        reasons.append(f"copy evidence incomplete: {copy.missing[0]} of {copy.missing[1]} CLIP candidates not fetched")
    if replication is None:
        reasons.append(
            "replication not tested: no copy detector (embedding.copy_detection.model is null) and no "
            "calibrated thresholds.clip_replication"
        )
    if passes:
        flags.append("copy_neighbor")
    if replicated:
        if pixel_copy or (verbatim is not None and R >= verbatim):
            subtype = "verbatim"
        elif tile_share is not None and tile_share >= t.template_tiles:
            subtype = "template"
        else:
            subtype = "partial"
        matching = _normalize_text(top.get("caption")) == _normalize_text(prompt)
        webster = "TV" if subtype == "template" else ("MV" if matching else "RV") if subtype == "verbatim" else None
        flags += ["replication", subtype]
        k_text = f"{k_above}" if k_above < len(nbrs) else f">={k_above}"
        dup = f">={duplication}" if duplication >= len(nbrs) else f"{duplication}"
        group_text = (
            f"; the copied image is {dup} time(s) among the {len(nbrs)} neighbours (near-duplicates at {link:.3f})"
            if grouped
            else "; near-duplicate groups unknown (no pair scores): exact duplicates only"
        )
        bg_text = ""
        if bg_p95 is not None:
            above = "above" if R > bg_p95 else "not above"
            bg_text = f", {above} the train-train background p95 {_fmt(bg_p95)}"
        pix = ""
        if pixel_max is not None:
            within = f"{tile_share:.0%} of tiles <= {t.pixel_l2}{_pixel_bg_text(pixel_bg)}"
            pix = f"; tiled pixel l2 {_fmt(pixel_max)} ({within})"
        elif pixel is not None and pixel.error:
            pix = "; pixel check unavailable (training image unreadable)"
        name = "replication" if copy.space == "sscd" else "clip_replication"
        reasons.append(
            f"replication: {space} top-1 {_fmt(R)} to training image '{top['train_id']}'"
            f" (>= {name} {_fmt(replication)}{bg_text}); {k_text} distinct training image(s) above it"
            f" (<= {t.eidetic_k}){group_text}{pix}; {subtype}" + (f" ({webster})" if webster else "")
        )
    elif passes:
        why = (
            f"{k_above} distinct training images above the threshold (> {t.eidetic_k}: a common look, not one image)"
            if k_above > t.eidetic_k
            else f"not above the background p95 {_fmt(bg_p95)}"
            + (
                f", and its tiled pixel l2 {_fmt(pixel_max)} is not below the pixel background p5 {_fmt(pixel_bg)}"
                " (distinct training images come as close)"
                if pixel_close
                else ""
            )
        )
        reasons.append(f"no replication: {space} top-1 {_fmt(R)} but {why}")
    elif R is not None and replication is not None:
        reasons.append(f"no replication: {space} top-1 {_fmt(R)} < {_fmt(replication)}")
    elif replication is not None and copy.source == "sscd_candidates":
        reasons.append("no replication: no CLIP candidate could be fetched and compared (no copy evidence)")
    return Replication(
        replication,
        R,
        top,
        k_above,
        duplication,
        bg_p95,
        pixel_max,
        tile_share,
        replicated,
        subtype,
        webster,
        flags,
        reasons,
    )


def _entity_rendered(ctx: PromptContext, ev: dict, r: dict, t: ThresholdsConfig) -> tuple[bool, str]:
    """Whether the image renders the prompt's entity, and why: against its tagged training images'
    centroid, else its text probe (beating the placebo names), beyond the null images; without a class
    noun, the CLIP prompt score."""
    ent_logit, ent_p = ev["entity_logit"], ev["entity_p"]
    level = "entity_alpha" if t.entity_alpha is not None else "null_alpha"
    beyond = f"p={_fmt(ent_p)} (paired over {ev['entity_pairs']} seeds and this image; {level} {t.entity_level})"
    unseen = " (no training image carries its tag: judged by the text probe)" if _unseen(ctx) else ""
    if _has_reference(ctx) and ent_p is not None:
        rendered = ent_p <= t.entity_level
        why = (
            f"entity '{ctx.entity}': cosine {ent_logit / LOGIT_SCALE:.3f} to the mean of its "
            f"{ctx.reference.count} training images, beyond the null images ('{ctx.entity_class}') at {beyond}"
        )
    elif _has_reference(ctx):
        rendered = ent_logit / LOGIT_SCALE >= t.clip_floor
        why = (
            f"entity '{ctx.entity}': cosine {ent_logit / LOGIT_SCALE:.3f} to the mean of its "
            f"training images (floor {t.clip_floor}, no null images)"
        )
    elif ent_p is not None:
        rendered = ent_p <= t.entity_level and _beats_names(ev)
        why = (
            f"entity '{ctx.entity}' vs '{ctx.entity_class}': beyond the null images at {beyond}{unseen}"
            + _names_text(ev)
        )
    elif ent_logit is not None:
        rendered = sigmoid(ent_logit) >= t.element_presence and _beats_names(ev)
        why = (
            f"entity '{ctx.entity}' vs '{ctx.entity_class}': P={_fmt(sigmoid(ent_logit))} (uncalibrated){unseen}"
            + _names_text(ev)
        )
    else:
        score = r.get("clip_prompt_score")
        rendered = score is not None and score >= t.clip_floor
        why = f"CLIP prompt score {_fmt(score)} (floor {t.clip_floor}, no class noun)"
    return rendered, why


def _decide(
    ctx,
    r,
    nbrs,
    copy: CopyEvidence,
    ev,
    cluster_member,
    pixel: PixelEvidence | None,
    t,
    regions: RegionMatch | None = None,
    rows_by_id=None,
    region_bg: float | None = None,
    pixel_bg: float | None = None,
    mark: PrivateMark | None = None,
    dup: DuplicatedPatch | None = None,
    *,
    render_share: float,
    entity_decision: tuple[bool, str],
) -> dict:
    # -- replication ------------------------------------------------------------------------------
    rep = replication_evidence(copy, nbrs, pixel, pixel_bg, t, ctx.prompt)
    flags, reasons = list(rep.flags), list(rep.reasons)
    R, top, replicated, subtype, webster = rep.score, rep.top, rep.replicated, rep.subtype, rep.webster
    k_above, duplication, bg_p95 = rep.breadth, rep.duplication, rep.background_p95
    pixel_max, tile_share, replication = rep.pixel_l2, rep.tile_share, rep.threshold

    # -- the entity ---------------------------------------------------------------------------------
    ent_logit, ent_z, ent_p = ev["entity_logit"], ev["entity_z"], ev["entity_p"]
    rendered, why_rendered = entity_decision  # decided for every image of the prompt (its render share)
    reasons.append(why_rendered)
    if rendered:
        flags.append("entity_rendered")

    # -- elements -----------------------------------------------------------------------------------
    elements = ev["elements"]
    explicit = [e for e in elements if e["kind"] == "explicit"]
    explicit_ok = all(e["present"] for e in explicit)
    implied, instance = [], []
    for e in elements:
        if e["kind"] == "explicit":
            flags.append(f"explicit:{e['element']}" if e["present"] else f"explicit_missing:{e['element']}")
            continue
        if not e["present"]:
            continue
        flags.append(f"{e['kind']}:{e['element']}")
        if e["kind"] == "instance":
            instance.append(e)
        elif e["share"] >= t.consistency and (
            e["kind"] == "implicit" or ((e["lift"] or 0) >= t.min_lift and (e["support"] or 0) >= t.min_support)
        ):
            implied.append(e)

    def describe(e) -> str:
        z = ""
        if e.get("image_p") is not None:
            z += f", this image p={e['image_p']:.3f}"
        if e.get("prompt_p") is not None:
            z += f", paired over {e['pairs']} seeds: logit +{e['effect']:.2f}, p={e['prompt_p']:.3f} (BH)"
        if not z and e["kind"] != "explicit":
            z = ", uncalibrated"
        assoc = f", lift {e['lift']:.1f} over {e['support']} training images" if e["lift"] is not None else ""
        return f"'{e['element']}' ({e['kind']}) P={_fmt(e['presence'])}{z}, in {e['share']:.0%} of seeds{assoc}"

    # With `mi_needs_entity`, an implied element counts for a prompt whose entity the model renders (in at
    # least RENDERED_SHARE of its images); elsewhere it is recorded with why, never MI.
    gated = t.mi_needs_entity and render_share < RENDERED_SHARE
    without_entity = implied if implied and gated else []
    if without_entity:
        flags.append("implied_without_entity")
        reasons.append(
            f"implied element(s) not counted: the entity is rendered in {render_share:.0%} of the prompt's images "
            f"(< {RENDERED_SHARE:.0%}), so an element beyond the null there is not the entity's: "
            + "; ".join(describe(e) for e in without_entity)
        )
        implied = []

    # The user's expectation decides (the paper's criterion): a copy of the very work the prompt asks
    # for is what the user wanted -- unless it also carries content nobody asked for (an instance
    # element: a private mark, a watermark), which makes it MU again.
    requested = replicated and _names_copied_work(ctx, top)
    if requested:
        flags.append("requested_copy")
        reasons.append(f"requested copy: {requested}")
    # A region of a training image reproduced where the whole image is not a copy (a background behind
    # a new foreground, a shared watermark): content nobody asked for, unless that training image is
    # the very work the prompt names -- and only beyond what distinct training images already share at
    # the same position (the region background, like R above the train-train p95): in a world of
    # look-alikes a shared layout is no copy.
    region = None
    if regions is not None and not replicated and len(regions.tiles) >= t.region_tiles:
        region_ev, region_tiles = regions.evidence, regions.tiles
        region_row = (rows_by_id or {}).get(region_ev.train_id, {"train_id": region_ev.train_id})
        region_l2 = max(region_ev.tile_l2[i] for i in region_tiles)
        bg_text = (
            f"; the region background p99 is {region_bg:g} tiles (training patches duplicated at l2 <= "
            f"{t.region_duplicate_l2} left out)"
            if region_bg is not None
            else "; no region background (no sampled training image could be compared)"
        )
        region_text = (
            f"{len(region_tiles)} of {region_ev.grid * region_ev.grid} tiles of training image "
            f"'{region_ev.train_id}' copied at the same position (tiles {region_tiles}, l2 <= {_fmt(region_l2)} "
            f"<= region_l2 {t.region_l2}, texture >= {t.region_texture}){bg_text}"
        )
        if region_bg is not None and len(region_tiles) <= region_bg:
            reasons.append(f"no region copy: {region_text} (not above it: distinct training images share as much)")
        elif regions.breadth > t.region_breadth:
            reasons.append(
                f"no region copy: {region_text}; {regions.breadth} distinct training regions match as much "
                f"(> region_breadth {t.region_breadth}): a look, not one image's content"
            )
        elif _names_copied_work(ctx, region_row):
            flags.append("requested_region")
            reasons.append(f"region of the requested work: {region_text}")
        else:
            region = {
                "train_id": region_ev.train_id,
                "tiles": region_tiles,
                "l2": region_l2,
                "breadth": regions.breadth,
            }
            flags.append("region")
            shared = (
                f"; the same patch is in {regions.duplicates} of the compared training images"
                if regions.duplicates > 1
                else ""
            )
            reasons.append(f"region copy: {region_text}{shared}")
    # A patch the training set repeats in distinct images (a watermark, a logo, a reused backdrop),
    # reproduced where neither the whole image nor a region of one image is a copy: the repetition was
    # memorized -- unless the repeated images are the work the prompt asks for.
    duplicated = None
    if dup is not None and not replicated and not region:
        a, b = dup.train_ids
        dup_text = (
            f"{len(dup.tiles)} tiles reproduced that training images '{a}' and '{b}' carry as the same pixels "
            f"(tiles {dup.tiles}; pair l2 <= region_duplicate_l2 {t.region_duplicate_l2}; scan image l2 <= "
            f"{_fmt(dup.l2)}, within region_l2 {t.region_l2} x texture / region_texture {t.region_texture}), "
            f"two images distinct elsewhere"
        )
        if any(_names_copied_work(ctx, (rows_by_id or {}).get(x, {"train_id": x})) for x in dup.train_ids):
            reasons.append(f"duplicated patch of the requested work: {dup_text}")
        else:
            duplicated = dup
            flags.append("duplicated_patch")
            reasons.append(
                f"duplicated patch: {dup_text}: content the training set repeats (a watermark, a logo, a "
                f"reused backdrop), not what the prompt asks for"
            )
    # Content of one copy of the requested work that most of its copies lack (a private mark on one
    # print of a poster): the work was asked for, the mark was not.
    private = None
    if mark is not None and not mark.tiles:
        reasons.append(
            f"no private mark: no tile copied from one of the {mark.copies} compared copies of the requested "
            f"work is one most of them provably lack"
        )
    elif mark is not None:
        mark_text = (
            f"{len(mark.tiles)} tiles of training image '{mark.train_id}' (a copy of the requested work) "
            f"reproduced at the same position (tiles {mark.tiles}, l2 <= {_fmt(mark.l2)}, within region_l2 "
            f"{t.region_l2} x texture / region_texture {t.region_texture}), where more than half of the "
            f"{mark.copies} compared copies of the work provably differ (at most {mark.carriers} carry it)"
        )
        if len(mark.tiles) >= t.region_tiles:
            private = mark
            flags.append("private_mark")
            reasons.append(f"private mark: {mark_text}: content of one copy, not the work")
        else:
            reasons.append(f"no private mark: {mark_text}; fewer than region_tiles {t.region_tiles}")
    # Every category the image shows, beside the one primary label (the paper's categories co-occur:
    # a requested entity rendered on a copied training background is ME and MU).
    mu_kinds = (
        ([subtype] if replicated and not requested else [])
        + (["region"] if region else [])
        + (["duplicated_patch"] if duplicated else [])
        + (["private_mark"] if private else [])
        + (["instance_element"] if instance else [])
    )
    is_mi = bool(implied)
    is_me = bool(rendered and explicit_ok) or bool(requested and not instance)
    if replicated and not requested:
        label = "MU"
    elif region:
        label, subtype = "MU", "region"
    elif duplicated:
        label, subtype = "MU", "duplicated_patch"
    elif private:
        label, subtype = "MU", "private_mark"
    elif instance:
        label, subtype = "MU", "instance_element"
        flags.append("instance_element")
        reasons.append(
            "instance-specific unprompted element shown"
            + _beyond_placebo(ctx)
            + ": "
            + "; ".join(describe(e) for e in instance)
        )
        if requested:
            reasons.append("the requested work was copied with content nobody asked for")
    elif implied:
        label = "MI"
        reasons.append("implied element(s) shown consistently: " + "; ".join(describe(e) for e in implied))
    elif requested:
        label, subtype = "ME", "requested_copy"
    elif rendered and explicit_ok:
        label = "ME"
        if explicit:
            reasons.append("explicit elements shown: " + ", ".join(describe(e) for e in explicit))
    else:
        label = "none"
        if explicit and not explicit_ok:
            reasons.append("missing: " + ", ".join(f"'{e['element']}'" for e in explicit if not e["present"]))
    if (replicated and not requested or region or duplicated or private) and instance:
        reasons.append(
            "also instance-specific unprompted element shown"
            + _beyond_placebo(ctx)
            + ": "
            + "; ".join(describe(e) for e in instance)
        )
    if is_mi and label != "MI":
        reasons.append("also MI: implied element(s) shown consistently: " + "; ".join(describe(e) for e in implied))
    if is_me and label != "ME":
        reasons.append(
            "also ME: the requested work was copied"
            if requested
            else "also ME: the entity is rendered with every explicit element"
        )
    if label not in ("MI", "MU"):
        # The implied elements that were looked for and why they did not count, for the reviewer.
        unshown = [e for e in elements if e["kind"] == "implicit" and e not in implied and e not in without_entity]
        if unshown:
            reasons.append("implied element(s) not counted: " + "; ".join(_why_not(e, t) for e in unshown))
    if cluster_member:
        flags.append("seed_cluster")
    # the copied part of a training image behind an MU region label: (train_id, tiles, worst l2)
    copied_patch = (
        (region["train_id"], region["tiles"], region["l2"])
        if region
        else (duplicated.train_ids[0], duplicated.tiles, duplicated.l2)
        if duplicated
        else (private.train_id, private.tiles, private.l2)
        if private
        else (None, None, None)
    )
    return {
        "label": label,
        "subtype": subtype,
        "is_MU": bool(mu_kinds),
        "mu_subtypes": mu_kinds,
        "is_MI": is_mi,
        "is_ME": is_me,
        "webster": webster,
        "flags": flags,
        "reasons": f"{label}: " + "; ".join(reasons),
        "replication_score": R,
        "replication_train_id": top["train_id"] if top is not None else None,
        "eidetic_k": k_above,
        "duplication": duplication if replicated else None,
        "copy_evidence": copy.source if replication is not None else "none",
        "candidates_missing": copy.missing[0] if copy.missing is not None else None,
        "background_p95": bg_p95,
        "pixel_l2": pixel_max,
        "pixel_tile_share": tile_share,
        "pixel_tile_l2": list(pixel.tile_l2) if pixel_max is not None else None,
        "region_train_id": copied_patch[0],
        "region_tiles": copied_patch[1],
        "region_l2": copied_patch[2],
        "region_background_p99": region_bg,
        "pixel_background_p5": pixel_bg if pixel_max is not None else None,
        "region_breadth": regions.breadth if regions is not None and not replicated else None,
        "cluster_member": cluster_member,
        "entity_presence": (ent_logit / LOGIT_SCALE if _has_reference(ctx) else sigmoid(ent_logit))
        if ent_logit is not None
        else None,
        "entity_z": ent_z,
        "entity_p": ent_p,
        "elements": [{k: e[k] for k in ELEMENT_FIELDS} for e in elements],
    }
