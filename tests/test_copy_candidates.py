"""Two-stage copy detection end to end: a training table with CLIP embeddings only (as LAION ships),
its images behind a real HTTP server on 127.0.0.1, a moto S3 server and a WebDataset tar, some of them
gone. The demo world's planted copies (one verbatim, one resized + JPEG) must be found as MU with the
right train_id; unreachable candidates are counted, never a failed scan; a second scan fetches nothing
it already has."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raymem.config import parse_config
from raymem.errors import InputError
from raymem.pipeline import run_scan
from tests.conftest import demo_raw_config
from tests.servers import ImageServer, moto_s3

pytestmark = pytest.mark.ray

BUCKET = "raymem-candidates"
BROKEN = {"stall": 3, "missing": 3, "html": 2}  # non-planted rows whose image is gone, per failure route


@pytest.fixture(scope="module")
def world(demo_root, tmp_path_factory):
    """The demo's training table without sscd_embedding; image URIs spread over http, s3, a tar shard and
    local paths; a few rows broken. Ray starts after the S3 variables are set (workers inherit them)."""
    import boto3
    import ray

    root = tmp_path_factory.mktemp("clip-only")
    images = demo_root / "train" / "images"
    with moto_s3(BUCKET) as bucket, ImageServer(images, stall_s=4.0) as server:
        s3 = boto3.client("s3")
        table = pa.concat_tables(
            pq.read_table(f) for f in sorted((demo_root / "train" / "embeddings").glob("*.parquet"))
        )
        table = table.drop_columns(["sscd_embedding"])
        ids = table.column("train_id").to_pylist()
        broken = iter([route for route, n in BROKEN.items() for _ in range(n)])
        shard = root / "shard-000.tar"
        uris_ = []
        with tarfile.open(shard, "w") as tar:
            for train_id in ids:
                name = f"{train_id}.png"
                where = zlib.crc32(train_id.encode()) % 4
                if train_id == "planted-lighthouse-seed0":
                    where = 0  # the verbatim copy over http
                elif train_id == "planted-captain-seed1":
                    where = 2  # the resized + JPEG copy inside a WebDataset shard
                elif train_id.endswith(("-007", "-011")) and (route := next(broken, None)):
                    uris_.append(f"{server.url}/{route}/{name}")
                    continue
                if where == 0:
                    uris_.append(f"{server.url}/files/{name}")
                elif where == 1:
                    s3.put_object(Bucket=BUCKET, Key=f"images/{name}", Body=(images / name).read_bytes())
                    uris_.append(f"{bucket}/images/{name}")
                elif where == 2:
                    data = (images / name).read_bytes()
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    uris_.append(f"{shard}#{name}")
                else:
                    uris_.append(str(images / name))
        assert sum("/stall/" in u or "/missing/" in u or "/html/" in u for u in uris_) == sum(BROKEN.values())
        table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri", pa.array(uris_))
        embeddings = root / "embeddings"
        embeddings.mkdir()
        pq.write_table(table.slice(0, 200), embeddings / "part-00000.parquet")
        pq.write_table(table.slice(200), embeddings / "part-00001.parquet")
        ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield {"embeddings": embeddings, "server": server, "root": root, "table": table}
        finally:
            ray.shutdown()


def config(demo_root, world, name="two-stage", **candidates):
    raw = demo_raw_config(demo_root)
    raw["name"] = name
    raw["training"]["embeddings"] = str(world["embeddings"])
    raw["output"] = {"uri": str(world["root"] / "out"), "scan_date": "2026-11-30"}
    raw["generation"]["seeds_per_prompt"] = 2
    raw["signals"]["null_seeds"] = 2
    # Region checks read pixels on every scan (they keep no cache); these tests count the candidate
    # cache's fetches, so region detection (on in the test world) is off here.
    raw["signals"]["region_neighbours"] = 0
    raw["embedding"]["copy_detection"]["candidates"] = {
        "k": 400,  # more than the 362 training rows: every image is a candidate of every unit
        "background_sample": 24,
        "timeout_s": 2.5,  # below the stall route's 4 s; 1 s timed out a healthy image on a loaded 2-core CI box
        "retries": 0,
        **candidates,
    }
    return parse_config(raw)


@pytest.fixture(scope="module")
def first(demo_root, world):
    world["server"].reset_counts()
    return run_scan(config(demo_root, world))


def read(result, name) -> pa.Table:
    return pq.read_table(result.tables[name])


def test_planted_copies_in_a_clip_only_table_are_found_as_MU_with_the_right_train_id(first):
    assert first.counts["copy_detection"] == "candidates"
    labels = {(r["prompt_id"], r["seed"]): r for r in read(first, "labels").to_pylist()}
    verbatim, near = labels[("lighthouse", 0)], labels[("captain", 1)]
    assert verbatim["label"] == "MU" and verbatim["replication_train_id"] == "planted-lighthouse-seed0"
    assert verbatim["subtype"] == "verbatim" and verbatim["replication_score"] > 0.99
    assert near["label"] == "MU" and near["replication_train_id"] == "planted-captain-seed1"  # from the tar
    assert near["replication_score"] > 0.75
    assert {r["copy_evidence"] for r in labels.values()} == {"sscd_candidates"}
    assert "CLIP candidates top-1" in verbatim["reasons"]
    assert verbatim["eidetic_k"] >= 1 and verbatim["duplication"] >= 1  # grouped from the fetched embeddings
    # the pixel check read the copied image over http
    rows = read(first, "pixel_checks").to_pylist()
    checks = {r["unit_id"]: r for r in rows if r["query_set"] == "units"}
    assert max(checks[verbatim["unit_id"]]["tile_l2"]) < 0.01
    assert checks[verbatim["unit_id"]]["score"] == pytest.approx(verbatim["replication_score"], abs=1e-6)
    # the pixel background pairs training images by CLIP here (no SSCD in the table): no copy-space score
    background = [r for r in rows if r["query_set"] == "background"]
    assert background and all(r["score"] is None for r in background)


def test_neighbours_say_how_they_were_found_and_the_background_is_measured_in_sscd(first):
    neighbors = read(first, "neighbors")
    via = {(r["space"], r["via"]) for r in neighbors.select(["space", "via"]).to_pylist()}
    assert via == {("clip", "join"), ("sscd", "candidates")}
    per_unit = neighbors.group_by(["unit_id", "space"]).aggregate([("rank", "max")])
    assert max(per_unit.column("rank_max").to_pylist()) == 12  # join.k of the demo, not the 400 candidates
    background = {r["space"]: r for r in read(first, "background").to_pylist()}
    assert background["sscd"]["source"] == "candidates" and 0 < background["sscd"]["n"] <= 24
    assert -1 <= background["sscd"]["p95"] <= 1
    # nearest distinct candidate: the share whose near-duplicates were passed over is published with it
    assert 0 <= background["sscd"]["near_duplicated"] <= 1


def test_unreachable_candidates_are_counted_per_unit_and_do_not_fail_the_scan(first, world):
    candidates = read(first, "candidates")
    units = candidates.filter(pc.equal(candidates.column("query_set"), "units"))
    assert units.num_rows == first.counts["units_ok"] * world["table"].num_rows
    statuses = {
        r["image_uri"].split("/")[3]: r["status"] for r in units.to_pylist() if r["image_uri"].startswith("http")
    }
    assert statuses.get("stall") == "timeout" and statuses.get("missing") == "not_found"
    assert statuses.get("html") == "not_image" and statuses.get("files") == "ok"
    assert set(units.column("status").to_pylist()) <= {"ok", "timeout", "not_found", "not_image"}
    stats = first.counts["copy_candidates"]
    assert stats["status"]["ok"] == stats["distinct_images"] - sum(BROKEN.values())
    # every unit's missing count in labels is exactly its non-ok candidates
    missing = {}
    for r in units.to_pylist():
        missing[r["query_id"]] = missing.get(r["query_id"], 0) + (r["status"] != "ok")
    for r in read(first, "labels").to_pylist():
        assert r["candidates_missing"] == missing[r["unit_id"]]
        if missing[r["unit_id"]]:
            assert "not fetched" in r["reasons"] and "candidates_missing" in r["flags"]
    assert any(missing.values())
    # the SSCD rank of every candidate agrees with its score
    ok = units.filter(pc.equal(units.column("status"), "ok"))
    assert ok.column("sscd_score").null_count == 0 and ok.column("content_sha256").null_count == 0


def test_a_second_scan_fetches_nothing_it_already_has(demo_root, world, first):
    server = world["server"]
    server.reset_counts()
    second = run_scan(config(demo_root, world, name="two-stage-again"))
    stats = second.counts["copy_candidates"]
    assert stats["fetched"] == sum(BROKEN.values())  # only what failed last night is tried again
    assert stats["cached"] == stats["distinct_images"] - sum(BROKEN.values())
    # over http only the broken routes were asked again, plus the pixel checks' images: the copied image
    # of each scan image checked, both images of each background pair (which may sit on a broken route)
    sets = read(second, "pixel_checks").column("query_set").to_pylist()
    pixel_reads = sets.count("units") + 2 * sets.count("background")
    assert sum(BROKEN.values()) <= server.total_requests("/") <= pixel_reads + sum(BROKEN.values())
    candidates = read(second, "candidates")
    ok = candidates.filter(pc.equal(candidates.column("status"), "ok"))
    assert ok.num_rows and all(ok.column("cached").to_pylist())
    first_labels = {r["unit_id"]: (r["label"], r["replication_train_id"]) for r in read(first, "labels").to_pylist()}
    second_labels = {r["unit_id"]: (r["label"], r["replication_train_id"]) for r in read(second, "labels").to_pylist()}
    assert first_labels == second_labels


def test_a_clip_only_table_without_image_uris_is_refused_before_anything_runs(demo_root, world, tmp_path):
    table = world["table"].drop_columns(["image_uri"])
    (tmp_path / "emb").mkdir()
    pq.write_table(table, tmp_path / "emb" / "part-0.parquet")
    cfg = config(demo_root, world)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"embeddings": str(tmp_path / "emb")})})
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"uri": str(tmp_path / "out")})})
    with pytest.raises(InputError, match="neither sscd_embedding nor image_uri") as err:
        run_scan(cfg)
    assert "part-0.parquet" in str(err.value) and "sscd_embedding" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_validate_says_so_in_one_line(demo_root, world, tmp_path, capsys):
    import yaml

    from raymem.cli import main

    table = world["table"].drop_columns(["image_uri"])
    (tmp_path / "emb").mkdir()
    pq.write_table(table, tmp_path / "emb" / "part-0.parquet")
    raw = json.loads(config(demo_root, world).model_dump_json())
    raw["training"]["embeddings"] = str(tmp_path / "emb")
    path = Path(tmp_path / "scan.yaml")
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither sscd_embedding nor image_uri" in err[0]


def test_the_sampled_images_candidate_scores_give_the_nearest_distinct_background():
    """Each sampled image's SSCD scores to its fetched candidates, best first; its reposts (>= the link,
    at most eidetic_k of them) are passed over as in the joined background (raymem.background)."""
    from raymem.background import distinct_percentiles
    from raymem.copy_candidates import padded

    per_image = [[0.2, 0.97, 0.31], [0.4], [0.3, 0.25]]
    matrix = padded(per_image)
    np.testing.assert_allclose(matrix[0], [0.97, 0.31, 0.2])
    assert np.isneginf(matrix[1, 1:]).all()
    measured = distinct_percentiles(matrix, 0.75, 10)
    assert measured["n"] == 3 and measured["p99"] < 0.41 and measured["near_duplicated"] == pytest.approx(1 / 3)
