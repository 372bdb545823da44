"""raymem.calibrate on labeler inputs with known geometry (the scan-level path is in test_pipeline)."""

from raymem.calibrate import fit, fit_order, precision_recall
from raymem.config import ThresholdsConfig
from raymem.label import LabelInputs, label_units
from tests.test_label import context, gen, image, nulls, text_vectors


def test_without_a_copy_detector_calibrate_fits_clips_own_replication_threshold():
    ctx = context(explicit=())
    scores = {"u0": 0.991, "u1": 0.986, "u2": 0.93, "u3": 0.90}
    rows = [{**g, "sscd_embedding": None} for g in [gen(u, i, image(ctx)) for i, u in enumerate(scores)] + nulls(ctx)]
    neighbors = {u: {"clip": [{"train_id": f"t{u}", "score": s, "caption": "x"}]} for u, s in scores.items()}
    inputs = LabelInputs.from_rows(rows, {"p": ctx}, text_vectors(ctx), neighbors, {}, {})
    assert inputs.copy_space == "clip"
    assert fit_order(inputs)[0] == ("MU", ("clip_replication", "pixel_l2"))
    pilot = {"u0": "MU", "u1": "MU", "u2": "none", "u3": "none"}
    start = ThresholdsConfig()
    assert precision_recall(label_units(inputs, start), pilot)["MU"]["recall"] == 0.0  # not tested by default
    fitted, met = fit(inputs, pilot, start, target=0.9)
    assert 0.93 < fitted.clip_replication <= 0.986 and met["MU"]
    assert fitted.replication == start.replication  # SSCD's threshold is left alone
    after = precision_recall(label_units(inputs, fitted), pilot)["MU"]
    assert after["precision"] == 1.0 and after["recall"] == 1.0
