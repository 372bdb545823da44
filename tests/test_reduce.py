import pytest

from raymem.reduce import describe_controls, entity_tallies, implied_control_rate, mi_unspecific, prompt_tallies


def lab(uid, prompt, entity, label, status="ok", presence=0.9, memorized=False, flags=("entity_rendered",), score=0.2):
    return {
        "scan_id": "s",
        "unit_id": uid,
        "prompt_id": prompt,
        "entity": entity,
        "label": label if status == "ok" else None,
        "status": status,
        "consistency": 0.5,
        "memorized_prompt": memorized,
        "noise_norm": 2.0,
        "replication_score": score,
        "entity_presence": presence,
        "flags": list(flags),
    }


def test_prompt_and_entity_tallies():
    labels = [
        lab("1", "p1", "A", "MU", memorized=True, score=0.9),
        lab("2", "p1", "A", "ME", memorized=True),
        lab("3", "p1", "A", None, status="failed"),
        lab("4", "p2", "A", "MI"),
        lab("5", "p3", "B", "none", presence=0.1, flags=()),
        lab("6", "p3", "B", "none", presence=0.2, flags=()),
    ]
    pt = {r["prompt_id"]: r for r in prompt_tallies(labels)}
    assert pt["p1"]["n_units"] == 3 and pt["p1"]["n_scored"] == 2 and pt["p1"]["n_failed"] == 1
    assert pt["p1"]["n_MU"] == 1 and pt["p1"]["rate_MU"] == 0.5 and pt["p1"]["rate_ME"] == 0.5
    assert pt["p1"]["max_replication_score"] == 0.9 and pt["p1"]["memorized_prompt"] is True
    et = {r["entity"]: r for r in entity_tallies(labels, {"A": 1000, "B": 12})}
    assert et["A"]["n_prompts"] == 2 and et["A"]["n_units"] == 4 and et["A"]["n_scored"] == 3
    assert et["A"]["rate_MU"] == pytest.approx(1 / 3) and et["A"]["n_memorized_prompts"] == 1
    assert et["A"]["render_rate"] == 1.0 and et["A"]["entity_not_rendered"] is False
    assert et["A"]["under_represented"] is False
    # B is rare in training (12 < 200 images) and never rendered: measured, and the frequency says why.
    assert et["B"]["render_rate"] == 0.0 and et["B"]["entity_not_rendered"] is True
    assert et["B"]["under_represented"] is True and et["B"]["rate_none"] == 1.0
    assert et["B"]["mean_entity_presence"] == pytest.approx(0.15)


def test_not_rendered_is_measured_whatever_the_frequency():
    rows = [lab(str(i), "p", "C", "none", flags=("entity_rendered",) if i == 0 else ()) for i in range(4)]
    et = entity_tallies(rows, {"C": 5000})[0]  # frequent in training, yet drawn in 1 of 4 images
    assert et["render_rate"] == 0.25 and et["entity_not_rendered"] is True and et["under_represented"] is False
    assert entity_tallies(rows, {})[0]["under_represented"] is None  # no entity tags: unknown


def test_all_failed_prompt_has_no_rates():
    pt = prompt_tallies([lab("1", "p", "A", None, status="failed")])[0]
    assert pt["n_scored"] == 0 and pt["rate_MU"] is None


def test_every_category_an_image_shows_is_tallied_beside_the_primary_label():
    rows = [
        {**lab("1", "p", "A", "MU"), "is_MU": True, "is_ME": True, "is_MI": False},  # entity on a copied background
        {**lab("2", "p", "A", "MU"), "is_MU": True, "is_ME": False, "is_MI": True},
        {**lab("3", "p", "A", "ME"), "is_MU": False, "is_ME": True, "is_MI": False},
        {**lab("4", "p", "A", None, status="failed"), "is_MU": None, "is_ME": None, "is_MI": None},
    ]
    t = prompt_tallies(rows)[0]
    assert (t["n_MU"], t["n_ME"]) == (2, 1)  # primary labels
    assert (t["n_any_MU"], t["n_any_ME"], t["n_any_MI"]) == (2, 2, 1)
    assert t["rate_any_ME"] == pytest.approx(2 / 3) and t["n_ME_and_MU"] == 1 and t["n_MI_and_MU"] == 1
    assert t["n_ME_and_MI"] == 0


def test_the_implied_control_rate_counts_each_prompt_and_control_once():
    """Every image of a prompt carries the prompt's control tests; the rate counts each (prompt, element)
    once, with an exact interval, and ignores the other kinds."""

    def element(name, kind, p):
        return {"element": name, "kind": kind, "prompt_p": p, "present": False}

    rows = [
        {
            **lab(f"a{i}", "a", "A", "ME"),
            "elements": [element("minarets", "control", 0.01), element("x", "implicit", 0.0)],
        }
        for i in range(4)
    ] + [
        {
            **lab("b0", "b", "B", "ME"),
            "elements": [element("minarets", "control", 0.4), element("a river", "control", 0.3)],
        },
        {**lab("c0", "c", "C", "none"), "elements": [element("seagulls", "control", None)]},  # too few seeds
    ]
    rate = implied_control_rate(rows, 0.05)
    assert {k: rate[k] for k in ("probes", "beyond_null", "prompts")} == {"probes": 3, "beyond_null": 1, "prompts": 2}
    assert rate["rate"] == pytest.approx(1 / 3) and 0 < rate["interval"][0] < 1 / 3 < rate["interval"][1] < 1
    assert implied_control_rate([lab("d", "d", "D", "ME")], 0.05) is None  # no controls asked
    # one of three is within a 0.05 test's level (the interval reaches below it); twenty of thirty is not
    assert not mi_unspecific(rate) and describe_controls(rate).endswith("within the test's level")
    many = implied_control_rate(
        [
            {**lab(f"m{i}", f"m{i}", "M", "ME"), "elements": [element("minarets", "control", 0.01 if i < 20 else 0.5)]}
            for i in range(30)
        ],
        0.05,
    )
    assert mi_unspecific(many) and describe_controls(many).startswith("20 of 30 other entities' implied elements")
    # with thresholds.mi_needs_entity: beyond the null on a prompt whose entity the model renders in fewer
    # than half its images, where no image can be MI, the control does not pass the MI test either
    gated = rows + [
        {
            **lab(f"g{i}", "g", "G", "none", flags=("entity_rendered",) if i == 0 else ()),
            "elements": [element("minarets", "control", 0.01)],
        }
        for i in range(3)
    ]
    rate = implied_control_rate(gated, 0.05, needs_entity=True)
    assert (rate["probes"], rate["beyond_null"], rate["passed"]) == (4, 2, 1) and rate["rate"] == pytest.approx(1 / 4)
    assert implied_control_rate(gated, 0.05)["passed"] == 2  # by default the test alone decides
    assert "; 1 more beyond the null where the entity is not rendered)" in describe_controls(rate)
    # a manifest written before the gate has no `passed`: its line reads the test alone
    old = {k: v for k, v in implied_control_rate(rows, 0.05).items() if k != "passed"}
    assert describe_controls(old).startswith("1 of 3 other entities' implied elements pass the MI test")
