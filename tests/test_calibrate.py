"""raymem.calibrate on labeler inputs with known geometry (the scan-level path is in test_pipeline)."""

import numpy as np
import pytest

from raymem.calibrate import MIN_FIT_PROMPTS, fit, fit_order, precision_recall, too_few_prompts
from raymem.config import ThresholdsConfig
from raymem.label import LabelInputs, label_units
from raymem.label_inputs import PromptContext
from tests.test_label import context, gen, image, nulls, text_vectors


def test_without_a_copy_detector_calibrate_fits_clips_own_replication_threshold():
    ctx = context(explicit=())
    scores = {"u0": 0.991, "u1": 0.986, "u2": 0.93, "u3": 0.90}
    rows = [{**g, "sscd_embedding": None} for g in [gen(u, i, image(ctx)) for i, u in enumerate(scores)] + nulls(ctx)]
    neighbors = {u: {"clip": [{"train_id": f"t{u}", "score": s, "caption": "x"}]} for u, s in scores.items()}
    inputs = LabelInputs.from_rows(rows, {"p": ctx}, text_vectors(ctx), neighbors, {}, {})
    assert inputs.copy_space == "clip"
    assert fit_order(inputs)[0] == (
        "MU",
        ("clip_replication", "pixel_l2", "region_l2", "region_tiles", "region_breadth"),
    )
    pilot = {"u0": "MU", "u1": "MU", "u2": "none", "u3": "none"}
    start = ThresholdsConfig()
    assert precision_recall(label_units(inputs, start), pilot)["MU"]["recall"] == 0.0  # not tested by default
    fitted, met = fit(inputs, pilot, start, target=0.9, min_prompts=1)
    assert 0.93 < fitted.clip_replication <= 0.986 and met["MU"]
    assert fitted.replication == start.replication  # SSCD's threshold is left alone
    after = precision_recall(label_units(inputs, fitted), pilot)["MU"]
    assert after["precision"] == 1.0 and after["recall"] == 1.0


def test_a_category_is_fitted_only_from_pilot_images_of_enough_prompts():
    """One prompt's images are one observation of how a category looks: fitted to it, a threshold follows
    that prompt (a planted world lost all MI so). Below MIN_FIT_PROMPTS prompts the category keeps its
    thresholds and says why; from as many prompts, the same images are fitted."""
    ctx = context(explicit=())
    scores = {"u0": 0.991, "u1": 0.986, "u2": 0.93, "u3": 0.90, "u4": 0.989, "u5": 0.92}

    def scan(prompts: dict[str, str]) -> LabelInputs:
        contexts = {pid: PromptContext(**{**ctx.__dict__, "prompt_id": pid}) for pid in set(prompts.values())}
        rows = [
            {**gen(u, i, image(ctx), prompt_id=prompts[u], parent_prompt_id=prompts[u]), "sscd_embedding": None}
            for i, u in enumerate(scores)
        ]
        for pid in contexts:
            rows += [
                {**n, "unit_id": f"{pid}-{n['unit_id']}", "prompt_id": f"{pid}::null", "parent_prompt_id": pid}
                | {"sscd_embedding": None}
                for n in nulls(ctx)
            ]
        neighbors = {u: {"clip": [{"train_id": f"t{u}", "score": s, "caption": "x"}]} for u, s in scores.items()}
        return LabelInputs.from_rows(rows, contexts, text_vectors(ctx), neighbors, {}, {})

    pilot = {"u0": "MU", "u1": "MU", "u4": "MU", "u2": "none", "u3": "none", "u5": "none"}
    start = ThresholdsConfig()
    one_prompt = scan(dict.fromkeys(scores, "p"))
    assert too_few_prompts(one_prompt, pilot, MIN_FIT_PROMPTS) == {"MU": "1 pilot prompt(s) of it, fewer than 3"}
    fitted, met = fit(one_prompt, pilot, start, target=0.9)
    assert fitted == start and "MU" not in met
    # the same six images from three prompts (each with one copy and one non-copy): fitted
    three_prompts = scan({"u0": "a", "u2": "a", "u1": "b", "u3": "b", "u4": "c", "u5": "c"})
    assert too_few_prompts(three_prompts, pilot, MIN_FIT_PROMPTS) == {}
    fitted, met = fit(three_prompts, pilot, start, target=0.9)
    assert 0.93 < fitted.clip_replication <= 0.986 and met["MU"]


def test_calibrate_measures_the_noise_norm_as_a_detector_of_memorized_prompts():
    from raymem.calibrate import fit_noise_norm

    ctx = context(explicit=())
    contexts, rows, pilot = {}, [], {}
    # 3 memorized prompts (an MU pilot image) with high norms, 20 others with lower ones, one overlap
    norms = {**{f"m{k}": 9.0 + k for k in range(3)}, **{f"o{k}": 1.0 + 0.2 * k for k in range(20)}}
    norms["o19"] = 9.5  # a non-memorized prompt as high as the memorized ones
    for pid, norm in norms.items():
        contexts[pid] = PromptContext(**{**ctx.__dict__, "prompt_id": pid})
        for s in range(2):
            uid = f"{pid}-{s}"
            rows.append(gen(uid, s, image(ctx), prompt_id=pid, parent_prompt_id=pid, noise_norm=norm + 0.01 * s))
            pilot[uid] = "MU" if pid.startswith("m") and s == 0 else "none"
    inputs = LabelInputs.from_rows(rows, contexts, text_vectors(ctx), {}, {}, {})
    result = fit_noise_norm(inputs, pilot)
    assert (result.memorized_prompts, result.other_prompts) == (3, 20)
    assert result.auc == pytest.approx((3 * 19 + 2) / 60)  # o19 beats m0 only
    # just above the highest other prompt (o19, mean 9.505): 1 % of 20 prompts allows none of them
    assert result.threshold == pytest.approx(9.505)
    means = {pid: float(np.mean([norm, norm + 0.01])) for pid, norm in norms.items()}
    flagged = {pid for pid, m in means.items() if m >= result.threshold}
    assert flagged == {"m1", "m2"}
    assert fit_noise_norm(inputs, {u: "none" for u in pilot}).auc is None  # no memorized prompt to find


def test_region_thresholds_are_fitted_after_whole_image_copies_and_switched_off_when_they_only_hurt():
    from raymem.regions import RegionEvidence

    ctx = context(explicit=())
    units = ["copy", "region", "look1", "look2"]
    rows = [gen(u, i, image(ctx)) for i, u in enumerate(units)] + nulls(ctx)
    scores = {"copy": 0.95, "region": 0.2, "look1": 0.2, "look2": 0.2}
    neighbors = {u: {"sscd": [{"train_id": f"t{u}", "score": s, "caption": "x"}]} for u, s in scores.items()}
    inputs = LabelInputs.from_rows(rows, {"p": ctx}, text_vectors(ctx), neighbors, {}, {})

    def tiles(copied: int, l2: float):  # `copied` of 64 textured tiles at `l2`, the rest far apart
        return RegionEvidence("t", 8, (l2,) * copied + (0.4,) * (64 - copied), (0.2,) * 64)

    # a real region copy (24 tiles, l2 0.02) and a look every image of this world shares (3 tiles, 0.08)
    inputs.regions = {"region": [tiles(24, 0.02)], "look1": [tiles(3, 0.08)], "look2": [tiles(3, 0.08)]}
    start = ThresholdsConfig()
    assert {r["unit_id"] for r in label_units(inputs, start) if r["label"] == "MU"} == {
        "copy",
        "region",
        "look1",
        "look2",
    }
    pilot = {"copy": "MU", "region": "MU", "look1": "none", "look2": "none"}
    fitted, met = fit(inputs, pilot, start, target=1.0, min_prompts=1)
    assert met["MU"] and fitted.replication == start.replication  # nothing to change for the whole copy
    assert {r["unit_id"] for r in label_units(inputs, fitted) if r["label"] == "MU"} == {"copy", "region"}
    # when the pilot says no region copy is memorization, region detection is switched off
    pilot = {"copy": "MU", "region": "none", "look1": "none", "look2": "none"}
    fitted, met = fit(inputs, pilot, start, target=1.0, min_prompts=1)
    assert met["MU"] and {r["unit_id"] for r in label_units(inputs, fitted) if r["label"] == "MU"} == {"copy"}
    assert fitted.region_tiles > 24 or fitted.region_l2 < 0.02  # stricter than the real copy: no region copies


def test_the_null_level_is_never_fitted_beyond_a_test_level():
    """A pilot whose ME images the null explains about as well (entity test p 0.25-0.45) would be served
    best by a level of 0.5: the fit keeps the level a test's (at most 0.1) and says ME is not met."""
    ctx = context(explicit=())
    strengths = {"u0": 0.206, "u1": 0.208, "u2": 0.21, "u3": 0.209}  # entity test p 0.44 down to 0.25
    rows = [gen(u, i, image(ctx, entity=e, null=0.20)) for i, (u, e) in enumerate(strengths.items())]
    rows += nulls(ctx, entity=0.20, null=0.20, spread=0.01)
    inputs = LabelInputs.from_rows(rows, {"p": ctx}, text_vectors(ctx), {}, {}, {})
    pilot = dict.fromkeys(strengths, "ME")
    labels = {r["unit_id"]: r for r in label_units(inputs, ThresholdsConfig())}
    assert all(0.2 < labels[u]["entity_p"] < 0.5 for u in strengths)
    fitted, met = fit(inputs, pilot, ThresholdsConfig(), target=0.9, min_prompts=1)
    assert fitted.entity_level <= 0.1 and not met["ME"]
    assert fitted.null_alpha == ThresholdsConfig().null_alpha  # the entity's own level is fitted, not MI's
    # the level the fit refuses would have served this pilot perfectly
    wide = precision_recall(label_units(inputs, ThresholdsConfig(entity_alpha=0.5)), pilot)["ME"]
    assert wide["precision"] == 1.0 and wide["recall"] == 1.0


def test_a_target_met_on_a_small_pilot_is_reported_as_unproven():
    """Precision on a pilot is a proportion of few images: the report gives its exact interval and flags a
    target met on the point estimate that the interval does not exclude missing."""
    from raymem.calibrate import precision_interval, report, unproven

    labels = [{"unit_id": f"u{i}", "prompt_id": f"p{i // 4}", "label": "MU" if i < 10 else "none"} for i in range(40)]
    small = {f"u{i}": "MU" for i in range(10)} | {f"u{i}": "none" for i in range(10, 12)}
    pr = precision_recall(labels, small)
    assert (pr["MU"]["n"], pr["MU"]["prompts"], pr["MU"]["correct"], pr["MU"]["predicted"]) == (10, 3, 10, 10)
    assert precision_interval(pr["MU"]) == pytest.approx((0.6915, 1.0), abs=1e-4)
    assert set(unproven(pr, 0.9)) == {"MU", "none"}  # none: 2/2 is no evidence either
    assert "[0.69, 1.00]" in report(pr, pr).splitlines()[1]
    # 40 correct of 40 predicted: the interval's low end is above 0.9, nothing to flag
    large = {f"u{i}": "MU" for i in range(40)}
    labels = [{**r, "label": "MU"} for r in labels]
    assert unproven(precision_recall(labels, large), 0.9) == {}
    # a target missed on the point estimate is the fit's own warning, not this one
    assert unproven(precision_recall(labels, small), 0.9) == {}
