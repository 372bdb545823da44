"""The planted-memorization benchmark: its scoring, and a reduced end-to-end run (training included)."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem.errors import ConfigError
from raymem.planted.benchmark import (
    PlantedConfig,
    _presence_training,
    base_thresholds,
    evaluate,
    run_benchmark,
    run_name,
    target_verdict,
    targets_report,
)
from raymem.planted.training import TrainConfig
from raymem.planted.world import CURVE_COUNTS, ELEMENTS, ENTITIES, HARD_KINDS, REGION_KINDS, PresenceConfig, WorldConfig


def test_evaluate_counts_precision_recall_and_confusion():
    truth = {
        "a": {"expected": "MU", "planted": "x"},
        "b": {"expected": "ME", "planted": "x"},
        "c": {"expected": "none", "planted": "nothing: never shown"},
    }
    labels = [
        {"unit_id": "1", "prompt_id": "a", "seed": 0, "label": "MU", "reasons": ""},
        {"unit_id": "2", "prompt_id": "a", "seed": 1, "label": "ME", "reasons": ""},
        {"unit_id": "3", "prompt_id": "b", "seed": 0, "label": "ME", "reasons": ""},
        {"unit_id": "4", "prompt_id": "c", "seed": 0, "label": "none", "reasons": ""},
        {"unit_id": "5", "prompt_id": "c", "seed": 1, "label": None, "reasons": "not scored"},
    ]
    r = evaluate(labels, truth)
    m = {x["category"]: x for x in r["metrics"]}
    assert (m["MU"]["precision"], m["MU"]["recall"]) == (1.0, 0.5)
    assert (m["ME"]["precision"], m["ME"]["recall"]) == (0.5, 1.0)
    assert m["MI"]["precision"] is None and m["MI"]["recall"] is None
    assert r["control_none_rate"] == 0.5  # the failed unit counts against it
    assert (r["controls"]["correct"], r["controls"]["images"]) == (1, 2) and r["controls"]["ci"][0] < 0.5
    conf = {row["expected"]: row for row in r["confusion"]}
    assert conf["MU"]["predicted_ME"] == 1 and conf["none"]["predicted_failed"] == 1
    assert sum(v for row in r["confusion"] for k, v in row.items() if k.startswith("predicted_")) == 5
    assert any("MISSED" in line for line in targets_report(r))


def test_a_target_is_met_only_with_its_intervals_lower_end_at_the_floor_too():
    """Issue 12: precision and recall at their targets and each interval's lower end >= 0.85; an estimate
    at its target over a sample too small to show it is a miss, and says so."""
    assert target_verdict([(0.96, 0.95, [0.90, 0.99]), (1.0, 0.95, [0.86, 1.0])]) == "target met"
    assert target_verdict([(0.97, 0.95, [0.80, 1.0])]).startswith(
        "MISSED: estimate at target, interval's lower end 0.80"
    )
    assert target_verdict([(0.94, 0.95, [0.90, 0.97]), (None, 0.9, None)]) == "MISSED: 0.940 < 0.95, no estimate < 0.9"
    assert target_verdict([(0.95, 0.95, None)]) == "target met"  # no interval to judge (nothing resampled)


def test_what_an_image_shows_overrides_its_prompts_truth():
    """Marks and logos are truth per image (`image_truth`): an image showing a private mark or a logo is
    MU whatever its prompt asked; a logo subject's image without its logo is the named subject (ME); a
    control into which a logo leaked is no negative, and each is counted under a kind of its own."""
    from raymem.planted.benchmark import expected_label

    truth = {
        "logo-subject": {"expected": "MU", "planted": "a logo", "kind": "logo"},
        "poster-x": {"expected": "ME", "planted": "a requested poster", "kind": "marked"},
        "ctrl": {"expected": "none", "planted": "nothing: never shown", "kind": "control"},
    }
    seen = {
        "1": {"shows_logo": True, "logo": "Subject"},
        "2": {"shows_logo": False, "logo": None},
        "3": {"shows_mark": True, "shows_logo": False, "logo": None},
        "4": {"shows_mark": False, "shows_logo": False, "logo": None},
        "5": {"shows_logo": True, "logo": "Subject"},
        "6": {"shows_logo": False, "logo": None},
    }
    prompts = ["logo-subject", "logo-subject", "poster-x", "poster-x", "ctrl", "ctrl"]
    assert [expected_label(truth[p], seen[u]) for u, p in zip("123456", prompts)] == [
        *("MU", "ME", "MU"),
        *("ME", "MU", "none"),
    ]
    assert expected_label(truth["logo-subject"], {}) == "MU"  # a world without the pixel truth: as drawn
    labels = [
        {"unit_id": u, "prompt_id": p, "seed": i, "label": label, "reasons": ""}
        for i, (u, p, label) in enumerate(zip("123456", prompts, ["MU", "none", "MU", "ME", "none", "none"]))
    ]
    r = evaluate(labels, truth, 7, seen=seen)
    assert [i["expected"] for i in r["images"]] == ["MU", "ME", "MU", "ME", "MU", "none"]
    assert {k: (v["correct"], v["images"]) for k, v in r["kinds"].items()} == {
        "logo (logo shown)": (1, 1),
        "logo (no logo)": (0, 1),
        "marked (mark shown)": (1, 1),
        "marked (no mark)": (1, 1),
        "control (logo leaked)": (0, 1),
        "control": (1, 1),
    }
    assert (r["controls"]["correct"], r["controls"]["images"]) == (1, 1)  # the leak is not a negative
    assert [i["logo"] for i in r["images"]][:2] == ["Subject", None]


def test_runs_pool_over_worlds_with_prompts_of_each_world_as_clusters(tmp_path):
    from raymem.planted.benchmark import pool_results

    truth = {"a": {"expected": "MU", "planted": "x"}, "c": {"expected": "none", "planted": "nothing: never shown"}}
    dirs = []
    for seed, mu_label in ((7, "MU"), (11, "none"), (12, "MU")):  # world 11 misses its copy
        labels = [
            {"unit_id": f"{p}{s}", "prompt_id": p, "seed": s, "label": mu_label if p == "a" else "none", "reasons": ""}
            for p in "ac"
            for s in range(4)
        ]
        d = tmp_path / f"world{seed}-default"
        d.mkdir()
        pq.write_table(pa.Table.from_pylist(evaluate(labels, truth, seed)["images"]), d / "images.parquet")
        dirs.append(d)
    pooled = pool_results(dirs)
    mu = {m["category"]: m for m in pooled["metrics"]}["MU"]
    assert pooled["world_seeds"] == [7, 11, 12] and (mu["true_positives"], mu["expected"]) == (8, 12)
    assert pooled["control_none_rate"] == 1.0 and pooled["controls"]["ci_prompts"] == (1.0, 1.0)
    # 3 MU prompts (one per world) resampled as clusters: the interval is wider than over 12 images
    lo, hi = mu["recall_ci_prompts"]
    assert lo == 0.0 and hi == 1.0 and mu["recall_ci"][0] > 0.3
    with pytest.raises(ValueError, match="world seed 7 is already pooled"):
        pool_results([dirs[0], dirs[0]])
    with pytest.raises(ValueError, match="no images.parquet"):
        pool_results([tmp_path])
    # the same world trained with another seed pools beside it, its prompts in the same clusters
    retrained = tmp_path / "world7-train1-default"
    retrained.mkdir()
    labels = [{"unit_id": f"a{s}", "prompt_id": "a", "seed": s, "label": "none", "reasons": ""} for s in range(4)]
    pq.write_table(
        pa.Table.from_pylist(evaluate(labels, truth, 7, train_seed=1)["images"]), retrained / "images.parquet"
    )
    both = pool_results([dirs[0], retrained])
    assert both["world_seeds"] == [7] and both["runs"] == [(7, 0), (7, 1)]
    assert len({(i["world_seed"], i["prompt_id"]) for i in both["images"] if i["expected"] == "MU"}) == 1
    with pytest.raises(ValueError, match=r"world seed 7 \(training seed 1\) is already pooled"):
        pool_results([retrained, retrained])


def test_every_kind_of_planted_case_is_scored_on_its_own():
    """Hard cases, exact copies and each role: the share of their images labelled as expected, with
    intervals, so a kind the labeler misses shows even when its category's totals look fine."""
    truth = {
        "exact": {"expected": "MU", "planted": "x", "kind": "exact copy"},
        "varied": {"expected": "MU", "planted": "x", "kind": "varied"},
        "asked": {"expected": "ME", "planted": "x", "kind": "requested"},
        "old": {"expected": "MI", "planted": "x"},  # a world drawn before kinds: no kind, not scored as one
    }
    labels = [
        {"unit_id": f"{p}{s}", "prompt_id": p, "seed": s, "label": label, "reasons": ""}
        for p, label in (("exact", "MU"), ("varied", "none"), ("asked", "MU"), ("old", "MI"))
        for s in range(4)
    ]
    r = evaluate(labels, truth, 7)
    assert set(r["kinds"]) == {"exact copy", "varied", "requested"}
    assert [r["kinds"][k]["rate"] for k in ("exact copy", "varied", "requested")] == [1.0, 0.0, 0.0]
    assert r["kinds"]["varied"]["images"] == 4 and r["kinds"]["varied"]["ci"][1] < 0.7
    report = "\n".join(targets_report(r))
    assert "per kind of planted case" in report and "varied       0.000" in report


def test_models_directory_without_trained_models_is_one_line(tmp_path, capsys):
    from raymem.cli import main

    (tmp_path / "models" / "clip").mkdir(parents=True)
    code = main(["bench", "planted", "--work", str(tmp_path / "work"), "--models", str(tmp_path / "models")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert str(tmp_path / "models") in err and "pipeline/model_index.json is missing" in err
    assert not (tmp_path / "work").exists()  # checked before anything was drawn


@pytest.mark.ray
@pytest.mark.slow
# Trains three tiny models, indexes and scans 80 images with every variant of the world on: the one
# test allowed past the suite's 900 s (a hang is still caught), as it grows with every planted kind
@pytest.mark.timeout(1800)
def test_reduced_benchmark_end_to_end(local_ray, tmp_path):
    """Draw (with the hard cases and mining's captions), train (a few steps), index, scan with caption
    mining and score: every evaluation image is accounted for, and every kind of planted case scored."""
    cfg = PlantedConfig(
        work=str(tmp_path),
        seeds_per_prompt=2,
        null_seeds=2,
        num_inference_steps=5,
        world=WorldConfig(
            per_entity=10,
            per_class=6,
            poster_copies=4,
            hard_cases=True,
            implied_named=1 / 3,
            noisy_mentions=3,
            region_cases=True,
        ),
        region_neighbours=3,
        train=TrainConfig(vae_steps=20, unet_steps=30, clip_steps=20, batch_size=16, clip_batch_size=32),
        presence=PresenceConfig(per_entity=10, per_class=6, posters=4),
    )
    result = run_benchmark(cfg)
    results = Path(result["results_dir"])
    # one directory per world and setting
    assert results == tmp_path / "results" / "world7-default-regions3-hard-mining-regioncases"
    images = pq.read_table(results / "images.parquet").to_pylist()
    # 16 evaluation prompts, 8 hard posters, 6 curve entities, 10 region cases x 2 seeds
    assert len(images) == (16 + 8 + 6 + 10) * 2
    curve = {f"ME {n} images" for n in CURVE_COUNTS}
    kinds = {"ME", "MI", "control", "exact copy", *HARD_KINDS, *REGION_KINDS, *curve} - {"marked", "logo"}
    # a marked poster's images are scored by whether they show the mark, a logo subject's by whether they
    # show the logo, and any image that shows a logo its prompt never asked for as a leak (all from pixels)
    per_image = {"marked (mark shown)", "marked (no mark)", "logo (logo shown)", "logo (no logo)"}
    found = set(result["summary"]["kinds"])
    assert found - per_image - {f"{k} (logo leaked)" for k in kinds} == kinds
    assert found & {"logo (logo shown)", "logo (no logo)"} and found & {"marked (mark shown)", "marked (no mark)"}
    assert all((i["expected"] == "MU") == i["shows_mark"] for i in images if i["kind"] == "marked")
    assert all(i["shows_mark"] is None for i in images if i["kind"] != "marked")
    assert all(i["shows_logo"] is not None for i in images)  # the world has logos: every image is looked at
    assert all(i["expected"] == "MU" for i in images if i["shows_logo"])
    assert sum(k["images"] for k in result["summary"]["kinds"].values()) == len(images)
    # the requested works reached the scan's prompt table as such
    from raymem.outputs import read_scan_table

    scanned = read_scan_table(
        str(tmp_path / "scans" / Path(result["summary"]["models"]).name), result["summary"]["scan_id"], "prompts"
    )
    assert {p["prompt_id"] for p in scanned.to_pylist() if p["requests_work"]} == {
        i["prompt_id"] for i in images if i["kind"] in ("requested", "marked")
    }
    # with region detection on, each requested work's copies were sampled for the private-mark check
    # (4 copies each in this reduced world) and compared with its images
    scans = str(tmp_path / "scans" / Path(result["summary"]["models"]).name)
    entities = read_scan_table(scans, result["summary"]["scan_id"], "entities").to_pylist()
    works = {e["entity"]: e["work_copies"] for e in entities if e["work_copies"]}
    assert len(works) == 4 + 2 and all(len(c) == 4 for c in works.values())  # 2 hard + 4 region requested works
    checks = read_scan_table(scans, result["summary"]["scan_id"], "region_checks").to_pylist()
    compared = {c["train_id"] for c in checks if c["query_set"] == "units"}
    assert all(c["train_id"] in compared for copies in works.values() for c in copies)
    assert {i["expected"] for i in images} == {"MU", "MI", "ME", "none"}
    metrics = pq.read_table(results / "metrics.parquet").to_pylist()
    assert [m["category"] for m in metrics] == ["MU", "MI", "ME", "none"]
    confusion = pq.read_table(results / "confusion.parquet").to_pylist()
    assert sum(v for row in confusion for k, v in row.items() if k.startswith("predicted_")) == len(images)
    assert (results / "summary.json").exists() and result["summary"]["thresholds"] == {"min_support": 10}
    # mining ran on the scan: every named entity of the split reported, the unseen details mined as
    # instance elements (3 mentions each) and their entities' images scored as rule (b)'s negatives
    mined = result["summary"]["mining"]
    assert {m["entity"] for m in mined} == {e.name for e in ENTITIES if e.role != "control" and e.split == "eval"}
    assert all(m["detail_mined"] for m in mined)
    assert result["summary"]["instance_negatives"]["images"] == 2 * len(mined)
    # The trained pipeline was loaded by the scan through from_pretrained, like any diffusers model.
    assert (tmp_path / result["summary"]["models"].split("/")[-1] / "pipeline" / "model_index.json").exists()
    # ... and embedded with the presence CLIP, trained on its own corpus, not the generator's CLIP.
    presence = Path(result["summary"]["presence_clip"])
    assert presence.parent.parent == tmp_path and presence.parent.name.startswith("presence-")
    assert (presence.parent / "corpus" / "presence.jsonl").exists()
    index = json.loads(next(tmp_path.glob("index-*/_index.json")).read_text())
    assert str(presence) in json.dumps(index)
    # The calibrated branch: thresholds fitted on the calibration split's scan, then the evaluation
    # scanned with them (the same trained models, found by their digest).
    calibrated = run_benchmark(dataclasses.replace(cfg, calibrate=True))
    assert (
        calibrated["results_dir"].endswith("world7-calibrated-regions3-hard-mining-regioncases")
        and (results / "images.parquet").exists()
    )
    fitted = calibrated["summary"]["thresholds"]
    assert isinstance(fitted, dict) and set(fitted) >= {"replication", "null_alpha", "element_presence"}
    assert calibrated["summary"]["models"] == result["summary"]["models"]
    assert "calibrate_s" in calibrated["summary"]["timings"]
    # ... and what the fit did on its own pilot: per category precision with its interval, and whether the
    # pilot (a few prompts) shows the target at all
    pilot = {f["category"]: f for f in calibrated["summary"]["calibration"]}
    assert pilot and all(f["images"] > 0 and f["prompts"] >= 1 for f in pilot.values())
    for f in pilot.values():
        assert f["precision_ci"] is None or f["precision_ci"][0] <= f["precision"] <= f["precision_ci"][1]
        assert not f["unproven"] or (f["target_met"] and f["precision_ci"][0] < cfg.target_precision)
    report = "\n".join(targets_report(calibrated))
    assert report.count("calibration pilot, ") == len(pilot)
    assert all(
        m["recall_ci"] is None or 0 <= m["recall_ci"][0] <= m["recall_ci"][1] <= 1 for m in calibrated["metrics"]
    )
    # bench/presence_readout.py reads a published planted scan: an AUC per element and embedding space,
    # and a decision per implied-element probe
    readout = subprocess.run(
        [sys.executable, "bench/presence_readout.py", f"{scans}:{result['summary']['scan_id']}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    ceiling = readout.split("\n2. ")[0].splitlines()
    aucs = [float(line.split()[-1]) for line in ceiling if line.startswith("   world")]
    assert len(aucs) == 3 * len(ELEMENTS) and all(0 <= a <= 1 for a in aucs)  # text probe, CLIP, SSCD
    pooled = readout.split("pooled:")[1]
    assert "text probe (the scan's test)" in pooled and "sscd read-out" in pooled
    found = re.search(r"text probe \(the scan's test\)\s+found \d+/(\d+) .* rejected \d+/(\d+) ", pooled)
    # this world's prompts list no implied elements (mining's) and its few images mine none: negatives only
    assert found and int(found[2]) > 0, readout
    entities = readout.split("\n3. ")[1]
    assert re.search(r"ME  prompts, scan images drawn +\d+/\d+ ", entities.split("pooled:")[1]), readout
    # bench/entity_drawn.py reads the same run from the pixels: its oracle finds an entity's own training
    # images more often than the rest of its class (with 10 images an entity, far from the full world's
    # 0.95 / 0.013: nearest neighbours need the full world's 80), and every image of an evaluation ME
    # prompt is counted once
    drawn = subprocess.run(
        [sys.executable, "bench/entity_drawn.py", str(results)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    own, n_own, other, n_other = map(
        int, re.search(r"own training images shown (\d+)/(\d+), the class's others (\d+)/(\d+)", drawn).groups()
    )
    assert n_own and n_other and own / n_own > 2 * other / n_other, drawn
    split = re.search(r"  drawn: (.*)\n  not drawn: (.*)\n", drawn)
    counted = sum(int(n) for side in split.groups() for n in re.findall(r"\d+", side))
    labelled = pq.read_table(results / "images.parquet").to_pylist()
    assert counted == sum(1 for i in labelled if i["kind"] == "ME") > 0, drawn


def test_sscd_size_bench_measures_a_world_and_the_synthetic_floor(tmp_path):
    """bench/sscd_size.py (issue 12, item 4): the train-train SSCD background of a drawn world, exact
    duplicates left out (the world's posters are byte-identical copies: counted, every top-1 would be
    1.0), and of images that share no content, at every input size not below their drawing size."""
    from raymem.planted.world import build_world

    build_world(tmp_path / "world", WorldConfig(per_entity=2, per_class=2, poster_copies=3))
    out = subprocess.run(
        [sys.executable, "bench/sscd_size.py", str(tmp_path / "world"), "--synthetic", "--sizes", "32,64"]
        + ["--sample", "16"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    rows = {}
    for line in out.splitlines()[1:]:  # "<name, 25 wide>  <size>  <p50>  <p95>  <p99>"
        if not line.startswith("("):
            size, *percentiles = line[25:].split()
            rows[line[:25].strip(), int(size)] = [float(p) for p in percentiles]
    assert set(rows) == {
        ("the world", 32),
        ("the world", 64),
        ("white noise", 32),
        ("white noise", 64),
        ("smooth noise at 32 px", 32),
        ("smooth noise at 32 px", 64),
        ("smooth noise at 64 px", 64),
    }, out
    assert all(-1 <= p50 <= p95 <= p99 < 0.999 for p50, p95, p99 in rows.values()), out
    # what docs/planted.md reports: images with nothing in common are still far above 0.6 for SSCD
    assert all(rows[key][1] > 0.6 for key in rows if key[0] != "the world"), out
    failed = subprocess.run(
        [sys.executable, "bench/sscd_size.py"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert failed.returncode != 0 and "give a world directory, --synthetic, or both" in failed.stderr


def test_photo_copies_bench_decides_copies_of_photographs_with_and_without_reposts(tmp_path):
    """bench/photo_copies.py (issue 12, item 4): real SSCD at 288 px on scikit-image's photographs, through
    raymem index, the join and the labeler's copy rule; the reposts do not raise the background."""
    record = tmp_path / "photos.json"
    out = subprocess.run(
        [sys.executable, "bench/photo_copies.py", "--photos", "6", "--repost-share", "0.5", "--json", str(record)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    results = json.loads(record.read_text())
    assert set(results) == {"distinct", "reposts"}, out
    for name, run in results.items():
        decided = run["results"]
        assert len(decided) == 6 * 7 * 2, out
        copies = [r["replicated"] for r in decided if r["expected"] == "copy"]
        assert sum(copies) >= 0.9 * len(copies) and not any(r["replicated"] for r in decided if r["expected"] != "copy")
        assert run["background"]["p95"] < 0.5, (name, run["background"])
    assert (
        results["reposts"]["background"]["n"] == 6 + 3 * 3 and results["reposts"]["background"]["near_duplicated"] > 0
    )
    assert "== training set: reposts" in out
    # the region tile rule on the same photographs: no distinct pair shares a region, the pasted halves are found
    assert "distinct photo pairs with a region copy: fixed bound 0/30" in out and "pasted halves found: 6/6" in out


def test_presence_training_bench_reads_every_variant(tmp_path):
    """bench/presence_training.py (what limits MI: the presence CLIP's recipe or the world?) trains its
    variants and prints, per variant, a text-probe and a linear read-out AUC for every element."""
    out = subprocess.run(
        [sys.executable, "bench/presence_training.py", "--steps", "4", "--longer", "2", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == {"baseline", "longer", "pairs", "resnet"}, out
    for line in rows.values():
        aucs = [float(a) for a in re.findall(r"(\d\.\d\d) /(\d\.\d\d)", line) for a in a]
        assert len(aucs) == 2 * len(ELEMENTS) and all(0 <= a <= 1 for a in aucs), line
    assert {p.name for p in (tmp_path / "world7").iterdir()} >= {"baseline4", "longer8", "pairs4", "resnet4"}
    resnet = json.loads((tmp_path / "world7" / "resnet4" / "clip" / "open_clip_config.json").read_text())
    assert resnet["model_cfg"]["vision_cfg"]["layers"] == [1, 1, 1, 1]  # saved as trained: loads as a ResNet


def test_the_committed_models_are_the_default_worlds():
    """assets/planted-models belongs to the default world and training configs: the benchmark and the
    demo use it instead of training. A change to either config makes this fail until the models are
    retrained (`python bench/planted.py --retrain`) and committed with their new DIGEST."""

    from raymem.planted.benchmark import (
        COMMITTED_MODELS,
        COMMITTED_PRESENCE,
        PlantedConfig,
        _digest,
        prepare_models,
        prepare_presence,
    )
    from raymem.planted.world import world_key

    cfg = PlantedConfig()
    world = Path("build/planted") / f"world-{_digest(world_key(cfg.world))}"
    assert prepare_models(cfg, world) == COMMITTED_MODELS
    # the world with the hard cases is another world: its own digest, its own models
    hard = dataclasses.replace(cfg, world=dataclasses.replace(cfg.world, hard_cases=True))
    hard_world = Path("build/planted") / f"world-{_digest(world_key(hard.world))}"
    committed = (COMMITTED_MODELS / "DIGEST").read_text().strip()
    assert committed == f"models-{_digest([world.name, dataclasses.asdict(cfg.train)])}"
    assert hard_world != world and committed != f"models-{_digest([hard_world.name, dataclasses.asdict(hard.train)])}"
    assert (COMMITTED_MODELS / "pipeline" / "model_index.json").exists()
    # the presence CLIP the benchmark scans with, likewise (trained on the world's presence corpus)
    assert prepare_presence(cfg, COMMITTED_MODELS) == COMMITTED_PRESENCE
    # ... which the world with the hard cases shares: its corpus draws the cast, not the training images
    assert prepare_presence(hard, COMMITTED_MODELS) == COMMITTED_PRESENCE
    assert (COMMITTED_PRESENCE / "clip" / "open_clip_config.json").exists()
    assert prepare_presence(dataclasses.replace(cfg, presence=None), COMMITTED_MODELS) == COMMITTED_MODELS


def test_region_detection_is_off_in_the_benchmark_unless_asked_for(tmp_path):
    """`bench planted --region-neighbours N` scans with region copies on; the default is the scan
    config's (off), so the benchmark measures what ships."""
    from raymem.planted.benchmark import scan_config

    (tmp_path / "prompts-eval.jsonl").write_text('{"prompt_id": "p", "prompt": "a photo"}\n')
    (tmp_path / "clip").mkdir()
    made = {
        n: scan_config(PlantedConfig(region_neighbours=n), tmp_path, tmp_path, tmp_path / "index", "eval", {})
        for n in (0, 3)
    }
    assert made[0].signals.region_neighbours == 0 and made[3].signals.region_neighbours == 3
    # the placebo names are the scan config's default; --no-placebo-names scans without them
    assert made[0].signals.placebo_names
    off = scan_config(PlantedConfig(placebo_names=False), tmp_path, tmp_path, tmp_path / "index", "eval", {})
    assert not off.signals.placebo_names


def test_negative_probes_ask_every_prompt_without_an_implied_element_about_one_it_never_shows(tmp_path):
    from raymem.planted.benchmark import negative_probes, probed_prompts
    from raymem.planted.world import ELEMENTS

    prompts = [
        {"prompt_id": "mi", "prompt": "a", "entity": "A", "explicit_elements": [], "implicit_elements": ["seagulls"]},
        {"prompt_id": "me", "prompt": "b", "entity": "B", "explicit_elements": ["a moon"], "implicit_elements": []},
        {"prompt_id": "ctl", "prompt": "c", "entity": "C", "explicit_elements": [], "implicit_elements": []},
    ]
    (tmp_path / "prompts-eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    expected = {"mi": "MI", "me": "ME", "ctl": "none"}
    (tmp_path / "ground_truth.jsonl").write_text(
        "".join(json.dumps({"prompt_id": p, "expected": e, "planted": "x"}) + "\n" for p, e in expected.items())
    )
    path = probed_prompts(tmp_path, "eval", 12)
    rows = {r["prompt_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    probes = negative_probes(tmp_path, "eval")
    assert rows["mi"]["implicit_elements"] == ["seagulls"] and "mi" not in probes  # a real MI prompt: unchanged
    assert set(probes) == {"me", "ctl"} and all(rows[p]["implicit_elements"] == [probes[p]] for p in probes)
    assert probes["me"] != "a moon" and set(probes.values()) <= set(ELEMENTS)  # never its own explicit element
    assert rows["me"]["explicit_elements"] == ["a moon"] and "negative_probe" not in rows["me"]
    path.unlink()
    assert negative_probes(tmp_path, "eval") == probes == negative_probes(tmp_path, "eval")
    assert probed_prompts(tmp_path, "eval", 12).read_text() == "".join(json.dumps(r) + "\n" for r in rows.values())
    # scored: an MI label on a probed prompt is a false positive of the MI rule
    truth = {p["prompt_id"]: {"expected": e, "planted": "x"} for p, e in zip(prompts, ["MI", "ME", "none"])}
    labels = [
        {"unit_id": f"{p}{s}", "prompt_id": p, "seed": s, "label": "MI", "reasons": ""} for p in truth for s in (0, 1)
    ]
    result = evaluate(labels, truth, 12, probes)
    probed = result["probe_negatives"]
    # where captions name implied elements (`--mining`) an MI prompt lists none, and is still never probed
    mined = tmp_path / "mined"
    mined.mkdir()
    (mined / "prompts-eval.jsonl").write_text(json.dumps({**prompts[0], "implicit_elements": []}) + "\n")
    (mined / "ground_truth.jsonl").write_text(json.dumps({"prompt_id": "mi", "expected": "MI", "planted": "x"}))
    assert json.loads(probed_prompts(mined, "eval", 12).read_text())["implicit_elements"] == []
    assert negative_probes(mined, "eval") == {}
    assert {k: probed[k] for k in ("images", "correct", "rate")} == {"images": 4, "correct": 0, "rate": 0.0}
    assert probed["ci"][0] == 0.0 and probed["ci_prompts"] == (0.0, 0.0)
    assert any("negative implied-element probes not labelled MI: 0.000" in line for line in targets_report(result))


def test_both_entry_points_build_the_config_one_way():
    """`raymem bench planted` and bench/planted.py share `planted_config`: a world seed replaces only
    the seed (a quick world keeps its reduced size)."""
    from raymem.planted.benchmark import planted_config

    full = planted_config(work="w", world_seed=12, region_neighbours=3)
    quick = planted_config(work="w", world_seed=12, quick=True)
    assert full.world == WorldConfig(seed=12) and full.region_neighbours == 3 and full.negative_probes
    assert quick.world == dataclasses.replace(PlantedConfig.quick().world, seed=12) and quick.seeds_per_prompt == 4
    assert planted_config(work="w").world == WorldConfig()
    # the scan's CLIP: the independent presence CLIP unless --shared-clip, which names its results apart
    assert full.presence == PresenceConfig() and quick.presence == PlantedConfig.quick().presence
    shared = planted_config(work="w", world_seed=12, shared_clip=True)
    assert (
        shared.presence is None
        and run_name(shared) == "world12-default-sharedclip"
        and run_name(full) == ("world12-default-regions3")
    )
    # another training seed retrains the generator only: the presence CLIP (the instrument) is kept
    reseeded = planted_config(work="w", world_seed=12, train_seed=3)
    assert reseeded.train == dataclasses.replace(full.train, seed=3) and reseeded.world == full.world
    assert run_name(reseeded) == "world12-train3-default"
    assert _presence_training(reseeded.train, reseeded.presence) == _presence_training(full.train, full.presence)
    # region copies planted: scanned with region detection on (3 per space) unless told otherwise
    region = planted_config(work="w", region_cases=True)
    assert region.world == WorldConfig(region_cases=True) and region.region_neighbours == 3
    assert run_name(region) == "world7-default-regions3-regioncases"
    assert planted_config(work="w", region_cases=True, region_neighbours=0).region_neighbours == 0
    assert planted_config(work="w").region_neighbours == 0
    # the presence CLIP's image tower: a ResNet is another instrument, named apart; meaningless when shared
    resnet = planted_config(work="w", region_cases=True, presence_tower="resnet")
    assert resnet.presence == PresenceConfig(image_tower="resnet") and resnet.world == region.world
    assert run_name(resnet) == "world7-default-regions3-regioncases-resnetclip"
    # a training table with CLIP embeddings only, and the labeler without its placebo names: named apart
    untagged = planted_config(work="w", region_cases=True, untagged=True, placebo_names=False)
    assert untagged.untagged and not untagged.placebo_names and untagged.world == region.world
    assert run_name(untagged) == "world7-default-regions3-regioncases-untagged-noplacebonames"
    assert not region.untagged and region.placebo_names and not region.mi_needs_entity
    gated = planted_config(work="w", region_cases=True, mi_needs_entity=True)
    assert run_name(gated) == "world7-default-regions3-regioncases-mineedsentity"
    assert base_thresholds(gated) == {"mi_needs_entity": True} and base_thresholds(region) == {}
    with pytest.raises(ConfigError, match="--presence-tower"):
        planted_config(work="w", presence_tower="resnet", shared_clip=True)
    with pytest.raises(ConfigError, match="'swin' is not one of vit, resnet"):
        planted_config(work="w", presence_tower="swin")


def test_the_script_and_the_cli_parse_the_same_options_into_the_same_config():
    """bench/planted.py and `raymem bench planted` declare their options once (raymem.planted.options)."""
    import importlib.util

    from raymem.cli import build_parser
    from raymem.planted.options import planted_config_from_args

    spec = importlib.util.spec_from_file_location("planted_script", Path(__file__).parents[1] / "bench/planted.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for argv in (
        [],
        ["--world-seed", "12", "--calibrate", "--shared-clip"],
        ["--hard-cases", "--mining"],
        ["--region-cases"],
        ["--region-cases", "--region-neighbours", "0"],
        ["--region-cases", "--presence-tower", "resnet"],
        ["--region-cases", "--untagged", "--no-placebo-names"],
        ["--region-cases", "--mi-needs-entity", "--calibrate"],
        ["--quick", "--region-neighbours", "3", "--work", "w2", "--models", "m", "--retrain", "--train-seed", "2"],
    ):
        from_script = planted_config_from_args(script.build_parser().parse_args(argv))
        from_cli = planted_config_from_args(build_parser().parse_args(["bench", "planted", *argv]))
        assert from_script == from_cli
    assert from_cli.work == "w2" and from_cli.retrain and from_cli.seeds_per_prompt == 4 and from_cli.train.seed == 2


def test_the_mining_world_is_scanned_with_mining_at_its_support_floor_and_scored_for_rule_b(tmp_path):
    """`--mining`: another world (its own results), scanned with caption mining at the world-sized support
    floor, with the presence CLIP of the world without it; the MU rule (b)'s negatives are the images of
    entities whose captions mention a detail nobody drew, wrong when flagged instance_element."""
    from raymem.planted.benchmark import (
        COMMITTED_MODELS,
        COMMITTED_PRESENCE,
        MINING_MIN_SUPPORT,
        base_thresholds,
        noisy_prompts,
        planted_config,
        prepare_presence,
        scan_config,
    )

    mining, plain = planted_config(work="w", mining=True), planted_config(work="w")
    assert mining.world.implied_named == pytest.approx(1 / 3) and mining.world.noisy_mentions == 3
    assert run_name(mining) == "world7-default-mining" and run_name(plain) == "world7-default"
    assert prepare_presence(mining, COMMITTED_MODELS) == COMMITTED_PRESENCE
    for name in ("prompts-eval.jsonl", "prompts-eval-probed.jsonl"):
        (tmp_path / name).write_text('{"prompt_id": "p", "prompt": "a photo"}\n')
    (tmp_path / "clip").mkdir()
    made = {
        "mining": scan_config(mining, tmp_path, tmp_path, tmp_path / "index", "eval", base_thresholds(mining)),
        "plain": scan_config(plain, tmp_path, tmp_path, tmp_path / "index", "eval", base_thresholds(plain)),
    }
    assert made["mining"].signals.mine_elements and made["mining"].thresholds.min_support == MINING_MIN_SUPPORT
    assert not made["plain"].signals.mine_elements and made["plain"].thresholds.min_support == 50
    noisy = noisy_prompts(mining.world)
    assert noisy and noisy_prompts(plain.world) == {} and "lunar-lighthouse" in noisy
    truth = {"lunar-lighthouse": {"expected": "ME", "planted": "x"}, "qadira": {"expected": "MI", "planted": "x"}}
    labels = [
        {"unit_id": "a", "prompt_id": "lunar-lighthouse", "seed": 0, "label": "ME", "reasons": "", "flags": []},
        {
            "unit_id": "b",
            "prompt_id": "lunar-lighthouse",
            "seed": 1,
            "label": "MU",
            "reasons": "",
            "flags": ["instance_element"],
        },
        {"unit_id": "c", "prompt_id": "qadira", "seed": 0, "label": "MI", "reasons": "", "flags": None},
    ]
    result = evaluate(labels, truth, 7, None, 0, {"lunar-lighthouse": noisy["lunar-lighthouse"]})
    negatives = result["instance_negatives"]
    assert (negatives["images"], negatives["correct"]) == (2, 1)
    assert any("not flagged instance_element: 0.500" in line for line in targets_report(result))
    assert evaluate(labels, truth, 7)["instance_negatives"]["images"] == 0  # no noisy world: nothing scored


def test_a_region_setting_out_of_bounds_is_one_line_before_anything_is_drawn(tmp_path, capsys):
    from raymem.cli import main

    code = main(["bench", "planted", "--work", str(tmp_path / "work"), "--region-neighbours", "-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--region-neighbours" in err and "greater than or equal to 0" in err
    assert not (tmp_path / "work").exists()


@pytest.mark.ray
def test_caption_mining_finds_what_the_mining_world_planted(local_ray, tmp_path):
    """The mining world's captions, mined by the scan's own miner at the benchmark's support floor: every
    MI entity's implied element is found, every unseen detail is an instance element, and no entity
    that implies nothing gets an implied term. `mining_report` says the same from the mined rows."""
    import numpy as np

    from raymem.captions import caption_terms
    from raymem.mining import mine_associations
    from raymem.planted.benchmark import MINING_MIN_SUPPORT, ground_truth, mining_report
    from raymem.planted.world import build_world, noisy_details
    from raymem.schema import embedding_array
    from raymem.sources import inspect_training

    world = WorldConfig(per_entity=30, per_class=20, poster_copies=5, implied_named=1 / 3, noisy_mentions=3)
    build_world(tmp_path / "world", world)
    rows = [json.loads(line) for line in (tmp_path / "world" / "world.jsonl").read_text().splitlines()]
    table = pa.table(
        {
            "train_id": [r["train_id"] for r in rows],
            "clip_embedding": embedding_array(np.eye(len(rows), 4, dtype=np.float32), 4),
            "caption": [r["caption"] for r in rows],
            "entities": pa.array([r["entities"] for r in rows], pa.list_(pa.string())),
        }
    )
    (tmp_path / "table").mkdir()
    pq.write_table(table, tmp_path / "table" / "part-0.parquet")
    named = [e for e in ENTITIES if e.role != "control"]
    mined = mine_associations(
        inspect_training(str(tmp_path / "table"), {}),
        {e.name: caption_terms(e.name) for e in named},
        min_lift=2.0,
        min_support=MINING_MIN_SUPPORT,
        instance_support=10,
        per_entity=5,
    )
    details = noisy_details(world.seed)
    for e in named:
        implied = {a.element for a in mined[e.name].implied}
        # the implied element; besides it at most an ME entity's explicit one (named in about half its
        # captions, as its prompt names it: never probed as unprompted)
        assert caption_terms(e.implied) <= implied <= caption_terms(e.implied) | caption_terms(e.explicit), e.name
        assert caption_terms(details[e.name]) - {"sign"} <= {a.element for a in mined[e.name].instance}
    as_counts = {
        e: {"implied": [vars(a) for a in m.implied], "instance": [vars(a) for a in m.instance]}
        for e, m in mined.items()
    }
    truth = ground_truth(tmp_path / "world")
    report = {r["entity"]: r for r in mining_report(as_counts, world, truth)}
    assert set(report) == {e.name for e in named}
    assert all(r["implied_found"] == bool(r["implied"]) and r["detail_mined"] for r in report.values())
    assert not any(r["spurious_implied"] for r in report.values())


def test_every_tag_the_world_writes_is_indexed(tmp_path):
    """The index tags exactly the entities the world's training rows carry (cast, curve, region subjects,
    every poster -- requested works included: untagged, a requested work has no copies to sample and no
    frequency), and the controls, which no row carries."""
    from raymem.planted.benchmark import tagged_entities
    from raymem.planted.world import DEV_SEED, build_world, cast

    build_world(tmp_path, WorldConfig(per_entity=3, per_class=2, poster_copies=2, hard_cases=True, region_cases=True))
    rows = [json.loads(line) for line in (tmp_path / "world.jsonl").read_text().splitlines()]
    carried, tags = {e for r in rows for e in r["entities"]}, set(tagged_entities(tmp_path))
    assert carried <= tags and tags - carried == {e.name for e in cast(DEV_SEED)[0] if e.role == "control"}


def test_the_presence_clip_is_trained_with_the_image_tower_asked_for(tmp_path):
    """`--presence-tower resnet`: another instrument in its own cache directory, saved with its own
    open_clip config so that the scan's `local-dir:` loader builds a ResNet, and embedding like the ViT."""
    import numpy as np

    from raymem.config import ClipConfig
    from raymem.encoders import ClipEncoder
    from raymem.planted.benchmark import prepare_presence
    from raymem.planted.options import add_planted_options
    from raymem.planted.training import PRESENCE_TOWERS

    tiny = {
        "work": str(tmp_path),
        "presence": PresenceConfig(per_entity=2, per_class=2, posters=2),
        "train": TrainConfig(clip_steps=4, clip_batch_size=8),
    }
    vit = prepare_presence(PlantedConfig(**tiny), tmp_path / "unused")
    tiny["presence"] = dataclasses.replace(tiny["presence"], image_tower="resnet")
    resnet = prepare_presence(PlantedConfig(**tiny), tmp_path / "unused")
    assert vit != resnet and vit.parent == resnet.parent == tmp_path
    saved = {
        name: json.loads((d / "clip" / "open_clip_config.json").read_text())["model_cfg"]
        for name, d in (("vit", vit), ("resnet", resnet))
    }
    assert saved == PRESENCE_TOWERS
    assert json.loads((resnet / "training.json").read_text())["image_tower"] == "resnet"
    encoder = ClipEncoder(ClipConfig(model=f"local-dir:{resnet / 'clip'}", pretrained=None))
    assert type(encoder.model.visual).__name__ == "ModifiedResNet"
    emb = encoder.encode_images([np.zeros((32, 32, 3), np.uint8)] * 2)
    assert emb.shape == (2, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3)
    # the command-line choices are the towers training knows
    import argparse

    parser = argparse.ArgumentParser()
    add_planted_options(parser)
    tower = next(a for a in parser._actions if a.dest == "presence_tower")
    assert set(tower.choices) == set(PRESENCE_TOWERS) and tower.default == "vit"


def test_generate_throughput_bench_runs_both_sides_with_a_copy_detector(tmp_path):
    """bench/generate_throughput.py (issue 14, item 4; the GPU run's script) on the CPU: the bare loop and
    raymem's stage over the same units, with SSCD on, once per `chunks_at_once` asked for, every unit
    generated and both rates measured. A ratio, never a time, is what it reports; nothing here asserts one."""
    out = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, "bench/generate_throughput.py", "--size", "tiny", "--images", "8", "--seeds", "2"]
        + ["--batch-size", "2", "--steps", "2", "--copy-detection", "immaculate:sscd_distilled"]
        + ["--chunks-at-once", "1,2"]
        + ["--work", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    result = json.loads(out.read_text())
    assert [run["chunks_at_once"] for run in result["raymem_runs"]] == [1, 2]  # both against one bare loop
    for run in result["raymem_runs"]:
        assert run["units"] == 8 and run["failed"] == 0 and run["devices"] == ["cpu"]
        assert run["ratio_steady"] > 0 and run["ratio_stage"] > 0
    assert result["bare"]["device"] == "cpu" and result["raymem"] == result["raymem_runs"][-1]
