"""End to end on a real local Ray with two logical GPUs: the demo scan, a crashing unit, determinism."""

import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pytest

from raymem.config import parse_config
from raymem.pipeline import run_scan

pytestmark = pytest.mark.ray

MARKER = "RAISE"
CANARY = "canary-7d1e4b09"


@pytest.fixture(scope="module")
def ray_two_gpus():
    """Local Ray with 2 logical GPUs; a setup hook makes the pipeline raise on prompts containing MARKER."""
    import ray

    def inject_fault():  # defined locally so Ray ships it by value to every worker
        import raymem.diffusion as diffusion

        original = diffusion.load_pipeline

        def load(cfg, device):
            pipe = original(cfg, device)
            cls = type(pipe)
            call = cls.__call__

            def raising(self, *args, **kwargs):
                if any("RAISE" in p for p in kwargs.get("prompt") or []):
                    raise RuntimeError("injected fault for a prompt containing RAISE")
                return call(self, *args, **kwargs)

            cls.__call__ = raising
            return pipe

        diffusion.load_pipeline = load

    ray.init(
        address="local",
        num_cpus=3,
        num_gpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"worker_process_setup_hook": inject_fault},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def scan_config(demo_root, tmp_path_factory):
    """The demo config plus one prompt that crashes the pipeline; chunks of 3 mix it with healthy units."""
    from tests.conftest import demo_raw_config

    work = tmp_path_factory.mktemp("scan")
    prompts = (demo_root / "prompts.jsonl").read_text().splitlines()
    prompts.insert(1, json.dumps({"prompt_id": "crash", "prompt": f"{MARKER} the Old Mill", "entity": "Old Mill"}))
    (work / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    raw = demo_raw_config(demo_root)
    raw["prompts"] = str(work / "prompts.jsonl")
    raw["generation"]["batch_size"] = 3
    raw["resources"]["generation_actors"] = None  # one per (logical) GPU
    raw["output"]["scan_date"] = "2026-11-28"
    # A secret as users pass it to the workers (config_hash leaves `ray` out: the scan id is unchanged).
    raw["ray"] = {"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": CANARY}}}

    def config(output: str):
        return parse_config({**raw, "output": {**raw["output"], "uri": str(work / output)}})

    return config


@pytest.fixture(scope="module")
def first_scan(ray_two_gpus, scan_config):
    cfg = scan_config("out-a")
    return cfg, run_scan(cfg)


def read(root: Path, table: str):
    return pads.dataset(str(root / table), format="parquet", partitioning="hive").to_table()


def test_every_unit_has_a_row_and_the_crash_is_recorded(first_scan):
    cfg, result = first_scan
    everything = read(Path(cfg.output.uri), "generations").to_pylist()
    gens = [g for g in everything if g["role"] == "scan"]
    units = {(g["prompt_id"], g["seed"]) for g in gens}
    assert len(gens) == len(units) == 7 * 4  # 7 prompts x 4 seeds, each exactly once
    # plus 4 null images for each of the 6 prompts with a class noun (the crash prompt has none)
    nulls = [g for g in everything if g["role"] == "null"]
    assert len(nulls) == 6 * 4 and all(g["prompt_id"] == g["parent_prompt_id"] + "::null" for g in nulls)
    assert result.counts["null_units"] == 24
    failed = [g for g in gens if g["status"] == "failed"]
    assert {g["prompt_id"] for g in failed} == {"crash"} and len(failed) == 4
    assert all("injected fault" in g["error"] and g["clip_embedding"] is None for g in failed)
    ok = [g for g in gens if g["status"] == "ok"]
    # Batch-mates of the crashing units (chunks of 3 straddle prompts) were retried alone and completed.
    assert len(ok) == 24 and all(g["image_uri"] and Path(g["image_uri"]).exists() for g in ok)
    assert result.counts["units_failed"] == 4 and result.counts["units_ok"] == 24
    labels = read(Path(cfg.output.uri), "labels").to_pylist()
    assert {r["unit_id"] for r in labels} == {g["unit_id"] for g in gens}
    assert all(r["label"] is None for r in labels if r["status"] == "failed")
    tallies = {r["prompt_id"]: r for r in read(Path(cfg.output.uri), "prompt_tallies").to_pylist()}
    assert tallies["crash"]["n_failed"] == 4 and tallies["crash"]["n_scored"] == 0


def test_the_manifest_measures_the_mi_rules_false_positives_on_controls(first_scan):
    """Every prompt with a class noun was asked about other entities' implied elements (listed, as the
    demo's minarets, or mined); none is ever shown, and the manifest counts how many passed the MI rule's
    test, once per prompt and element."""
    cfg, result = first_scan
    labels = read(Path(cfg.output.uri), "labels").to_pylist()
    tested = {
        (r["prompt_id"], e["element"]): e["prompt_p"] <= cfg.thresholds.null_alpha
        for r in labels
        if r["status"] == "ok"
        for e in r["elements"]
        if e["kind"] == "control" and e["prompt_p"] is not None
    }
    assert tested and not any(e["present"] for r in labels for e in r["elements"] or () if e["kind"] == "control")
    controls = json.loads(Path(result.manifest_uri).read_text())["counts"]["implied_controls"]
    assert controls == result.counts["implied_controls"]
    assert (controls["probes"], controls["beyond_null"]) == (len(tested), sum(tested.values()))
    texts = read(Path(cfg.output.uri), "texts").to_pylist()  # every prompt's probes, failed ones' too
    implied = {t["element"] for t in texts if t["kind"] in ("implicit", "mined")}
    assert {e for _, e in tested} <= implied and {"minarets", "clouds"} <= implied
    for prompt_id, element in tested:  # never one the prompt is asked about itself
        assert not any(t["element"] == element and t["kind"] != "control" for t in texts if t["prompt_id"] == prompt_id)


def test_two_actors_were_pinned_to_different_gpus(first_scan):
    cfg, _ = first_scan
    gens = read(Path(cfg.output.uri), "generations").to_pylist()
    seen = {(g["worker"], g["cuda_visible_devices"]) for g in gens}
    assert {v for _, v in seen} == {"0", "1"}  # Ray gave each actor its own GPU
    assert len({w for w, _ in seen}) == 2
    assert {g["device"] for g in gens} == {"cpu"}  # logical GPUs: no CUDA here, so the actor used the CPU


def test_planted_copy_is_found_and_labelled_MU(first_scan):
    cfg, _ = first_scan
    labels = {(r["prompt_id"], r["seed"]): r for r in read(Path(cfg.output.uri), "labels").to_pylist()}
    planted = labels[("lighthouse", 0)]
    assert planted["replication_train_id"] == "planted-lighthouse-seed0"
    assert planted["replication_score"] > 0.99
    assert planted["label"] == "MU" and planted["subtype"] == "verbatim"
    neighbors = read(Path(cfg.output.uri), "neighbors").to_pylist()
    top = [n for n in neighbors if n["unit_id"] == planted["unit_id"] and n["space"] == "sscd" and n["rank"] == 1]
    assert top[0]["train_id"] == "planted-lighthouse-seed0" and top[0]["caption"]
    # the copy's neighbours above the threshold carry their similarity to each other (read back from the
    # training table): the planted image is 1.0 to itself, and the labeler grouped them
    assert top[0]["pair_scores"][0] == pytest.approx(1.0, abs=1e-4)
    assert planted["eidetic_k"] >= 1 and planted["duplication"] >= 1 and "time(s) among" in planted["reasons"]
    # the pixel confirmation was measured against sampled training images and their nearest other one
    checks = read(Path(cfg.output.uri), "pixel_checks").to_pylist()
    background = [c for c in checks if c["query_set"] == "background"]
    assert background and all(c["unit_id"] != c["train_id"] for c in background)
    assert {c["unit_id"] for c in checks if c["query_set"] == "units"} >= {planted["unit_id"]}
    assert planted["pixel_background_p5"] > planted["pixel_l2"] and "pixel background p5" in planted["reasons"]


def test_outputs_are_hive_partitioned_and_read_by_duckdb(first_scan):
    cfg, result = first_scan
    root = Path(cfg.output.uri)
    for table, uri in result.tables.items():
        assert f"/{table}/scan_date=2026-11-28/model=sd-tiny/part-{result.scan_id}-" in uri
    con = duckdb.connect()
    rows = con.sql(
        f"select model, scan_date, count(*) n, count(distinct prompt_id) p, "
        f"max(len(clip_embedding)) d from read_parquet('{root}/generations/**/*.parquet', hive_partitioning=true) "
        f"group by all"
    ).fetchall()
    assert rows == [("sd-tiny", __import__("datetime").date(2026, 11, 28), 28 + 24, 13, 64)]
    by_label = dict(
        con.sql(
            f"select label, count(*) from read_parquet('{root}/labels/**/*.parquet') where status='ok' group by label"
        ).fetchall()
    )
    assert sum(by_label.values()) == 24
    ent = con.sql(
        f"select entity, n_units from read_parquet('{root}/entity_tallies/**/*.parquet') order by entity"
    ).fetchall()
    assert dict(ent)["Old Mill"] == 8
    manifest = json.loads((root / "manifests" / f"{result.scan_id}.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["units"] == 28
    assert manifest["config_hash"] == cfg.config_hash() and manifest["versions"]["ray"]
    newest_table = max(os.path.getmtime(u) for u in result.tables.values())
    assert os.path.getmtime(root / "manifests" / f"{result.scan_id}.json") >= newest_table  # manifest last
    attempts = list((root / "_attempts" / result.scan_id).glob("*.json"))
    assert [json.loads(a.read_text())["status"] for a in attempts] == ["complete"]


def test_same_config_twice_gives_identical_images_and_embeddings(first_scan, scan_config):
    cfg_a, _ = first_scan
    cfg_b = scan_config("out-b")
    result_b = run_scan(cfg_b)
    assert result_b.counts["units_generated"] == 28 + 24
    a = {g["unit_id"]: g for g in read(Path(cfg_a.output.uri), "generations").to_pylist()}
    b = {g["unit_id"]: g for g in read(Path(cfg_b.output.uri), "generations").to_pylist()}
    assert a.keys() == b.keys()
    for uid, ga in a.items():
        gb = b[uid]
        assert ga["status"] == gb["status"]
        if ga["status"] != "ok":
            continue
        assert Path(ga["image_uri"]).read_bytes() == Path(gb["image_uri"]).read_bytes()
        np.testing.assert_array_equal(ga["clip_embedding"], gb["clip_embedding"])
        np.testing.assert_array_equal(ga["sscd_embedding"], gb["sscd_embedding"])


def test_rerun_reuses_units_and_adds_no_duplicate_rows(first_scan, scan_config):
    cfg, first = first_scan
    again = run_scan(scan_config("out-a"))
    assert again.scan_id == first.scan_id
    assert again.counts["units_generated"] == 0 and again.counts["units_reused"] == 28 + 24
    root = Path(cfg.output.uri)
    assert read(root, "generations").num_rows == 28 + 24
    assert len(list((root / "generations").rglob("*.parquet"))) == 1
    # --rerun-failed recomputes only the failed units (they fail again: the fault is deterministic).
    retried = run_scan(scan_config("out-a"), rerun_failed=True)
    assert retried.counts["units_generated"] == 4 and retried.counts["units_failed"] == 4
    assert read(root, "generations").num_rows == 28 + 24


def test_dimension_mismatch_found_after_generation_publishes_nothing(ray_two_gpus, scan_config, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymem.errors import InputError
    from raymem.schema import embedding_array

    train = tmp_path / "train"
    train.mkdir()
    pq.write_table(
        pa.table(
            {
                "train_id": ["a", "b"],
                "clip_embedding": embedding_array(np.eye(2, 16), 16),
                "image_uri": pa.array(["a.png", "b.png"]),  # copies by two-stage copy detection
            }
        ),
        train / "part-0.parquet",
    )
    base = scan_config("out-dim")
    cfg = parse_config({**base.model_dump(mode="json"), "training": {"embeddings": str(train)}})
    with pytest.raises(
        InputError,
        match=r"part-0.parquet: field 'clip_embedding': embedding dimension 16 does not "
        r"match the scan's clip model \(64\)",
    ):
        run_scan(cfg)
    root = Path(cfg.output.uri)
    manifest = json.loads(next((root / "manifests").glob("*.json")).read_text())
    assert manifest["status"] == "failed" and "embedding dimension 16" in manifest["error"]
    assert manifest["failed_stage"] == "after collect"  # the dimension check follows the collected units
    assert not list(root.glob("labels/**/*.parquet")) and not list(root.glob("generations/**/*.parquet"))


def test_calibrate_fits_thresholds_to_a_pilot_set(first_scan, tmp_path, capsys):
    """Humans say only the two planted copies are MU: calibration must move `replication` to get there."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from raymem.cli import main

    cfg, result = first_scan
    labels = read(Path(cfg.output.uri), "labels").to_pylist()
    planted = {("lighthouse", 0), ("captain", 1)}
    pilot = [
        {"unit_id": r["unit_id"], "label": "MU" if (r["prompt_id"], r["seed"]) in planted else "none"}
        for r in labels
        if r["status"] == "ok"
    ]
    pq.write_table(pa.Table.from_pylist(pilot), tmp_path / "pilot.parquet")
    config = tmp_path / "scan.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    fitted = tmp_path / "fitted.yaml"
    command = ["calibrate", str(config), "--pilot", str(tmp_path / "pilot.parquet"), "--target-precision", "1.0"]
    # two copies are two prompts: fewer than calibrate fits a category from unless told
    assert main([*command, "--write", str(fitted)]) == 0
    out = capsys.readouterr().out
    assert "warning: MU not fitted (2 pilot prompt(s) of it, fewer than 3, --min-prompts)" in out
    assert yaml.safe_load(fitted.read_text())["thresholds"]["replication"] == cfg.thresholds.replication
    code = main([*command, "--min-prompts", "2", "--write", str(fitted)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "not fitted" not in out
    mu = next(line for line in out.splitlines() if line.startswith("MU ")).split()
    assert mu[1:3] == ["2", "2"]  # two pilot copies, from two prompts
    assert mu[6:8] == ["1.00", "1.00"]  # after fitting: every planted copy, nothing else
    # ... which two images cannot show a precision of 1.0: the interval says so, and a warning
    assert " ".join(mu[8:]) == "[0.16, 1.00]"
    assert "warning: MU reaches the target on this pilot, but the pilot is too small to show it" in out
    assert "(precision 2/2, 95 % interval [0.16, 1.00], from 2 prompt(s))" in out
    thresholds = yaml.safe_load(fitted.read_text())["thresholds"]
    assert thresholds["replication"] > cfg.thresholds.replication
    # A pilot row that is not an image of this scan is refused with its row and field.
    pq.write_table(pa.Table.from_pylist(pilot[:1] + [{"unit_id": "nope", "label": "MU"}]), tmp_path / "bad.parquet")
    assert main(["calibrate", str(config), "--pilot", str(tmp_path / "bad.parquet")]) == 2
    err = capsys.readouterr().err
    assert "bad.parquet: row 2, field 'unit_id': 'nope' is not a scored image of this scan" in err


def test_re_deciding_a_published_scan_from_its_tables_reproduces_every_label(first_scan, tmp_path):
    """The scan labels from its staged tables; calibrate reads the published ones back: same decision."""
    import pyarrow as pa

    from raymem.calibrate import calibrate
    from raymem.config import ThresholdsConfig
    from raymem.label import label_units
    from raymem.label_inputs import LabelInputs
    from raymem.outputs import read_manifest, read_scan_table
    from raymem.schema import LABELS_TABLE

    cfg, result = first_scan
    root = cfg.output.uri
    thresholds = ThresholdsConfig.model_validate(read_manifest(root, result.scan_id)["config"]["thresholds"])
    inputs = LabelInputs.read(root, result.scan_id)
    # the paths that drifted before: the entity's training-image centroid, pixel checks, the background
    assert all(c.reference is not None and c.reference.centroid is not None for c in inputs.contexts.values())
    assert inputs.pixels and inputs.background and inputs.sscd is not None
    # region-level copy detection (on in the test world): scan images, the sampled training images, and
    # the training images compared with one scan image against each other (each pair once)
    assert len(inputs.regions) == 24 and len(inputs.region_background) >= 10
    assert result.counts["region_checks"] == sum(
        len(v) for v in (*inputs.regions.values(), *inputs.region_background.values(), *inputs.region_pairs.values())
    )
    compared = {u: sorted(e.train_id for e in evs if e.tile_l2 is not None) for u, evs in inputs.regions.items()}
    measured = {(a, e.train_id) for a, evs in inputs.region_pairs.items() for e in evs}
    assert measured and all(
        (x, y) in measured for ids in compared.values() for i, x in enumerate(ids) for y in ids[i + 1 :]
    )
    stored = read_scan_table(root, result.scan_id, "labels")
    again = pa.Table.from_pylist(label_units(inputs, thresholds), schema=LABELS_TABLE)
    assert again.num_rows == stored.num_rows == 28
    for name in LABELS_TABLE.names:
        assert again.column(name).to_pylist() == stored.column(name).to_pylist(), name

    # `raymem calibrate` decides through the same inputs: at the scan's thresholds, a pilot that agrees
    # with the stored labels is reproduced perfectly before any fitting.
    pilot = tmp_path / "pilot.jsonl"
    rows = [r for r in stored.to_pylist() if r["status"] == "ok"]
    pilot.write_text("".join(json.dumps({"unit_id": r["unit_id"], "label": r["label"]}) + "\n" for r in rows))
    calibration = calibrate(root, result.scan_id, str(pilot), thresholds, 0.9)
    for category, m in calibration.before.items():
        if m["n"]:
            assert m["precision"] == m["recall"] == 1.0, category


def test_no_secret_is_written_to_any_output(first_scan):
    cfg, result = first_scan
    root = Path(cfg.output.uri)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files and not [p for p in files if CANARY.encode() in p.read_bytes()]
    manifest = json.loads((root / "manifests" / f"{result.scan_id}.json").read_text())
    # the names stay, so an operator can see what was set
    assert manifest["config"]["ray"]["runtime_env"]["env_vars"] == {"AWS_SECRET_ACCESS_KEY": "<redacted>"}


def test_published_files_carry_each_column_description(first_scan):
    import pyarrow.parquet as pq

    from raymem.outputs import read_manifest

    cfg, result = first_scan
    # the committed files (other tests of this module re-run the same scan, superseding the first files)
    labels = pq.read_schema(read_manifest(cfg.output.uri, result.scan_id)["tables"]["labels"])
    assert labels.field("eidetic_k").metadata[b"description"].startswith(b"breadth: distinct training images")


def test_no_secret_reaches_the_ray_session_logs(first_scan):
    """The workers got the secret through runtime_env; neither Ray's logs nor the workers' (raymem logs
    there too: chunk failures, fetch errors) may carry it."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())  # this test's own Ray
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert logs, session
    assert not [p for p in logs if CANARY.encode() in p.read_bytes()]


def test_a_repeated_or_null_train_id_anywhere_fails_the_scan_and_publishes_nothing(ray_two_gpus, scan_config, tmp_path):
    """The id check rides along the join's read: an id repeated in two files (its two rows in no top-k
    together) or a null id fails the scan with one line naming file, row and field; nothing is published."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymem.errors import InputError

    base = scan_config("out-ids")
    files = sorted(Path(base.training.embeddings).glob("*.parquet"))
    first, last = pq.read_table(files[0]), pq.read_table(files[-1])
    repeated = first.column("train_id")[3].as_py()

    def with_ids(table: pa.Table, row: int, value) -> pa.Table:
        ids = table.column("train_id").to_pylist()
        ids[row] = value
        return table.set_column(table.schema.get_field_index("train_id"), "train_id", pa.array(ids, pa.string()))

    for case, value, expected in [
        ("dup", repeated, rf"part-2.parquet: row 5, field 'train_id': duplicate train_id '{repeated}' \(also at "),
        ("null", None, r"part-2.parquet: row 5, field 'train_id': train_id is null"),
    ]:
        train = tmp_path / case
        train.mkdir()
        pq.write_table(first, train / "part-0.parquet")
        for i, f in enumerate(files[1:-1]):
            pq.write_table(pq.read_table(f), train / f"part-1-{i}.parquet")
        pq.write_table(with_ids(last, 4, value), train / "part-2.parquet")  # the last file's 5th row
        cfg = parse_config({**base.model_dump(mode="json"), "training": {"embeddings": str(train)}})
        with pytest.raises(InputError, match=expected):
            run_scan(cfg)
    root = Path(base.output.uri)
    manifests = [json.loads(m.read_text()) for m in (root / "manifests").glob("*.json")]
    assert manifests and all(m["status"] == "failed" for m in manifests)
    assert not list(root.glob("labels/**/*.parquet")) and not list(root.glob("generations/**/*.parquet"))


def test_each_prompt_is_asked_about_other_entities_implied_elements_as_controls():
    """Controls come from the scan's implied elements (listed or mined), never one the prompt's own
    entity implies in any of its prompts, only where a class noun gives null images; 0 turns them off."""
    from raymem.pipeline import _scan_probes
    from raymem.prompts import Prompt

    def prompt(pid, entity, cls, implicit=(), explicit=()):
        return Prompt(pid, f"a photo of {entity}", entity, cls, tuple(explicit), tuple(implicit))

    prompts = [
        prompt("q1", "Qadira", "a city", implicit=("minarets",)),
        prompt("q2", "Qadira", "a city", implicit=("domes",)),
        prompt("m", "Old Mill", "a windmill", implicit=("a river",)),
        prompt("f", "Sunset Ferry", "a boat", explicit=("seagulls",)),
        prompt("n", "Nameless", ""),
    ]
    probes = _scan_probes(prompts, {}, 4)

    def controls(pid):
        return {p.element for p in probes[pid] if p.kind == "control"}

    assert controls("q1") == controls("q2") == {"a river"}  # not domes: Qadira implies it elsewhere
    assert controls("m") == {"minarets", "domes"}
    assert controls("f") == {"minarets", "domes", "a river"}
    assert controls("n") == set()  # no class noun, no null images
    assert not any(p.kind == "control" for ps in _scan_probes(prompts, {}, 0).values() for p in ps)
    # the placebo names: beside every entity with a class noun (signals.placebo_names), none when off
    names = {pid: sum(p.kind == "placebo_name" for p in ps) for pid, ps in probes.items()}
    assert names == {"q1": 19, "q2": 19, "m": 19, "f": 19, "n": 0}
    off = _scan_probes(prompts, {}, 4, placebo_names=False)
    assert not any(p.kind == "placebo_name" for ps in off.values() for p in ps)
    assert {pid: controls(pid) for pid in probes} == {
        pid: {p.element for p in ps if p.kind == "control"} for pid, ps in off.items()
    }
