"""Each labeler rule and precedence case on hand-built evidence with known geometry."""

import numpy as np
import pytest

from raymem.config import ThresholdsConfig
from raymem.label import Background, element_presence, entity_presence, label_units, largest_cluster

T = ThresholdsConfig()
BG = {"sscd": Background("sscd", p95=0.30, n=500)}


def unit_vectors(n, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def probes(entity="X", entity_score=0.30, null_score=0.20, explicit=(), implicit=()):
    """CLIP probe scores; an element's score is entity_score + delta (delta > 0: shown)."""
    out = [
        {"kind": "prompt", "element": "", "text": "p", "score": 0.3},
        {"kind": "entity", "element": entity, "text": "e", "score": entity_score},
        {"kind": "entity_null", "element": "a thing", "text": "n", "score": null_score},
    ]
    out += [{"kind": "explicit", "element": a, "text": a, "score": entity_score + d} for a, d in explicit]
    out += [{"kind": "implicit", "element": a, "text": a, "score": entity_score + d} for a, d in implicit]
    return out


def gen(uid, prompt_id, seed, emb, **kw):
    row = {
        "scan_id": "s",
        "unit_id": uid,
        "prompt_id": prompt_id,
        "entity": "X",
        "seed": seed,
        "status": "ok",
        "error": None,
        "sscd_embedding": emb,
        "clip_embedding": emb,
        "clip_prompt_score": 0.3,
        "noise_norm": 1.0,
        "probes": probes(),
    }
    row.update(kw)
    return row


def nbrs(*scores):
    return {"sscd": [{"train_id": f"t{i}", "score": s} for i, s in enumerate(scores)]}


def by_unit(labels):
    return {r["unit_id"]: r for r in labels}


def test_near_copy_with_unrequested_background_is_MU_verbatim():
    e = unit_vectors(4)
    rows = [gen(f"u{i}", "p", i, e[i], probes=probes(explicit=[("hat", 0.05)])) for i in range(4)]
    # u0 is a near copy of one training image (0.93); the others are far from everything.
    neighbors = {"u0": nbrs(0.93, 0.2), "u1": nbrs(0.2), "u2": nbrs(0.25), "u3": nbrs(0.1)}
    out = by_unit(label_units(rows, neighbors, BG, T))
    assert out["u0"]["label"] == "MU" and out["u0"]["subtype"] == "verbatim"
    assert "replication" in out["u0"]["flags"]
    assert "0.930" in out["u0"]["reasons"] and "'t0'" in out["u0"]["reasons"]
    assert out["u0"]["eidetic_k"] == 1
    # The requested entity is rendered in u0 too, yet the copy wins (precedence MU > ME).
    assert "entity_rendered" in out["u0"]["flags"]
    assert out["u1"]["label"] == "ME"


def test_partial_copy_between_thresholds():
    e = unit_vectors(1)
    out = label_units([gen("u", "p", 0, e[0])], {"u": nbrs(0.6)}, BG, T)[0]
    assert out["label"] == "MU" and out["subtype"] == "partial"


@pytest.mark.parametrize("score, label", [(0.4999, "ME"), (0.5, "MU"), (0.7499, "MU"), (0.75, "MU")])
def test_replication_threshold_edges(score, label):
    e = unit_vectors(1)
    out = label_units([gen("u", "p", 0, e[0])], {"u": nbrs(score)}, BG, T)[0]
    assert out["label"] == label
    if label == "MU":
        assert out["subtype"] == ("verbatim" if score >= 0.75 else "partial")


def test_copy_of_a_common_look_is_not_MU():
    """Many training images above the copy threshold: a generic look (k > eidetic_k), not one image."""
    e = unit_vectors(1)
    out = label_units([gen("u", "p", 0, e[0])], {"u": nbrs(*[0.8] * 11)}, BG, T)[0]
    assert out["label"] != "MU" and out["eidetic_k"] == 11
    assert "generic look" in out["reasons"]
    out = label_units([gen("u", "p", 0, e[0])], {"u": nbrs(*[0.8] * 10)}, BG, T)[0]
    assert out["label"] == "MU"


def test_copy_score_below_background_is_not_MU():
    e = unit_vectors(1)
    bg = {"sscd": Background("sscd", p95=0.85, n=100)}
    out = label_units([gen("u", "p", 0, e[0])], {"u": nbrs(0.8)}, bg, T)[0]
    assert out["label"] != "MU"
    assert "background p95 0.850" in out["reasons"]


def test_entity_rendered_without_copying_is_ME():
    e = unit_vectors(1)
    out = label_units([gen("u", "p", 0, e[0], probes=probes(explicit=[("hat", 0.05)]))], {"u": nbrs(0.2)}, BG, T)[0]
    assert out["label"] == "ME"
    assert out["entity_presence"] > 0.99
    assert out["elements"][0]["element"] == "hat" and out["elements"][0]["present"]


def test_missing_explicit_element_or_entity_is_none():
    e = unit_vectors(2)
    rows = [
        gen("a", "p", 0, e[0], probes=probes(explicit=[("hat", -0.05)])),
        gen("b", "q", 0, e[1], probes=probes(entity_score=0.2, null_score=0.3)),
    ]
    out = by_unit(label_units(rows, {"a": nbrs(0.1), "b": nbrs(0.1)}, BG, T))
    assert out["a"]["label"] == "none" and "explicit_missing:hat" in out["a"]["flags"]
    assert out["b"]["label"] == "none" and "entity_rendered" not in out["b"]["flags"]


def test_consistent_unrequested_associated_element_is_MI():
    e = unit_vectors(4)
    # 'minarets' shown in 3 of 4 seeds (>= consistency 0.5) -> MI in those three; u3 falls back to ME.
    rows = [
        gen(f"u{i}", "p", i, e[i], probes=probes(implicit=[("minarets", 0.05 if i < 3 else -0.05)])) for i in range(4)
    ]
    out = by_unit(label_units(rows, {f"u{i}": nbrs(0.1) for i in range(4)}, BG, T))
    assert [out[f"u{i}"]["label"] for i in range(4)] == ["MI", "MI", "MI", "ME"]
    assert "'minarets'" in out["u0"]["reasons"] and "75% of seeds" in out["u0"]["reasons"]


def test_rare_implied_element_is_not_MI():
    e = unit_vectors(4)
    rows = [
        gen(f"u{i}", "p", i, e[i], probes=probes(implicit=[("minarets", 0.05 if i == 0 else -0.05)])) for i in range(4)
    ]
    out = by_unit(label_units(rows, {f"u{i}": nbrs(0.1) for i in range(4)}, BG, T))
    assert out["u0"]["label"] == "ME" and "implicit:minarets" in out["u0"]["flags"]


def test_MU_beats_MI():
    e = unit_vectors(2)
    rows = [gen(f"u{i}", "p", i, e[i], probes=probes(implicit=[("minarets", 0.05)])) for i in range(2)]
    out = by_unit(label_units(rows, {"u0": nbrs(0.9), "u1": nbrs(0.1)}, BG, T))
    assert out["u0"]["label"] == "MU" and out["u1"]["label"] == "MI"


def test_nothing_is_none():
    e = unit_vectors(1)
    out = label_units(
        [gen("u", "p", 0, e[0], probes=probes(entity_score=0.1, null_score=0.3))], {"u": nbrs(0.05)}, BG, T
    )[0]
    assert out["label"] == "none" and out["flags"] == []


def test_consistency_and_memorized_prompt():
    base = unit_vectors(1, seed=1)[0]
    noise = unit_vectors(4, seed=2)
    close = [(base + 0.05 * n) / np.linalg.norm(base + 0.05 * n) for n in noise[:3]]
    far = noise[3]
    rows = [gen(f"u{i}", "p", i, v) for i, v in enumerate(close + [far])]
    out = by_unit(label_units(rows, {f"u{i}": nbrs(0.1) for i in range(4)}, BG, T))
    assert out["u0"]["consistency"] == pytest.approx(0.75)
    assert out["u0"]["memorized_prompt"] is True
    assert out["u0"]["cluster_member"] and not out["u3"]["cluster_member"]
    lone = label_units([gen("v", "q", 0, far)], {"v": nbrs(0.1)}, BG, T)[0]
    assert lone["consistency"] == 0.0 and lone["memorized_prompt"] is False


def test_failed_units_keep_status_and_get_no_label():
    e = unit_vectors(1)
    rows = [
        gen("ok", "p", 0, e[0]),
        gen("bad", "p", 1, None, status="failed", error="RuntimeError: boom", probes=None, noise_norm=None),
    ]
    out = by_unit(label_units(rows, {"ok": nbrs(0.1)}, BG, T))
    assert out["bad"]["label"] is None and out["bad"]["status"] == "failed"
    assert "RuntimeError: boom" in out["bad"]["reasons"]
    assert out["ok"]["label"] == "ME"


def test_largest_cluster_is_connected_component():
    v = np.array([[1, 0], [0.99, 0.141], [0, 1], [0.141, 0.99], [0.2, 0.98]], dtype=np.float32)
    assert largest_cluster(v, 0.95).tolist() == [False, False, True, True, True]


def test_presence_helpers():
    p = probes(explicit=[("hat", 0.02)], implicit=[("beard", -0.02)])
    el = {e["element"]: e["presence"] for e in element_presence(p, "X")}
    assert el["hat"] == pytest.approx(1 / (1 + np.exp(-2)))
    assert el["beard"] == pytest.approx(1 / (1 + np.exp(2)))
    assert entity_presence(p, "X") == pytest.approx(1 / (1 + np.exp(-10)))
    assert entity_presence([x for x in p if x["kind"] != "entity_null"], "X") is None
