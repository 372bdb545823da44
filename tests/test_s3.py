"""S3 end to end against a real S3 protocol server (moto's ThreadedMotoServer on 127.0.0.1):
models, prompt set, training images and index, and every scan output on s3://."""

import json
import logging
import os
import socket
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raymem import uri as uris
from raymem.errors import InputError

pytestmark = pytest.mark.ray

SECRET = "raymem-test-secret-do-not-log"
BUCKET = "raymem-test"
SERVER: dict = {}  # the running moto server (an outage test stops and restarts it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback; AWS variables set before Ray starts so workers inherit them."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    SERVER.update(server=server, port=port)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "RAYMEM_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield f"s3://{BUCKET}"
    ray.shutdown()
    SERVER["server"].stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def upload(local: Path, uri: str) -> None:
    fs, path = uris.filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_index_and_scan_entirely_on_s3(s3, demo_root, tmp_path, caplog):
    from raymem.config import IndexConfig, parse_config
    from raymem.index import run_index
    from raymem.pipeline import run_scan
    from tests.conftest import demo_raw_config

    caplog.set_level(logging.INFO)
    # Training images and their table on S3, indexed by `raymem index` from S3 to S3.
    upload(demo_root / "train" / "images", f"{s3}/train/images")
    rows = [json.loads(line) for line in (demo_root / "train" / "images.jsonl").read_text().splitlines()]
    table = "".join(json.dumps({**r, "image": f"{s3}/train/images/{Path(r['image']).name}"}) + "\n" for r in rows)
    uris.write_bytes(f"{s3}/train/images.jsonl", table.encode())
    raw = demo_raw_config(demo_root)
    index = run_index(
        IndexConfig.model_validate(
            {
                "input": {
                    "kind": "table",
                    "path": f"{s3}/train/images.jsonl",
                    "image_column": "image",
                    "id_column": "train_id",
                },
                "output": f"{s3}/index",
                "embedding": raw["embedding"],
                "entities": ["Lunar Lighthouse", "Captain Mira"],
                "shard_size": 200,
                "background_sample": 100,
            }
        )
    )
    assert index["rows"] == len(rows) and index["errors"] == 0

    # Models and the prompt set on S3 too.
    upload(demo_root / "sd-tiny", f"{s3}/models/sd-tiny")
    upload(demo_root / "clip-tiny", f"{s3}/models/clip-tiny")
    prompts = (demo_root / "prompts.jsonl").read_text().splitlines()[:2]  # lighthouse, captain
    uris.write_bytes(f"{s3}/prompts.jsonl", ("\n".join(prompts) + "\n").encode())
    raw.update(
        model={"id": f"{s3}/models/sd-tiny", "name": "sd-tiny"},
        prompts=f"{s3}/prompts.jsonl",
        training={"embeddings": f"{s3}/index"},
        output={"uri": f"{s3}/out", "scan_date": "2026-11-28"},
    )
    raw["embedding"]["clip"]["model"] = f"{s3}/models/clip-tiny"
    raw["generation"]["seeds_per_prompt"] = 2
    raw["signals"]["null_seeds"] = 2
    cfg = parse_config(raw)
    result = run_scan(cfg)

    assert all(uri.startswith(f"{s3}/out/") for uri in result.tables.values())
    manifest = json.loads(uris.read_bytes(result.manifest_uri))
    assert manifest["status"] == "complete" and manifest["counts"]["units"] == 4
    assert manifest["counts"]["background_source"] == "index"
    fs, path = uris.filesystem(result.tables["labels"])
    labels = {(r["prompt_id"], r["seed"]): r for r in pq.read_table(path, filesystem=fs).to_pylist()}
    planted = labels[("lighthouse", 0)]
    assert planted["label"] == "MU" and planted["replication_train_id"] == "planted-lighthouse-seed0"
    assert planted["pixel_l2"] is not None and planted["pixel_l2"] < 0.05  # the training image was read from S3
    gens = pq.read_table(uris.filesystem(result.tables["generations"])[1], filesystem=fs).to_pylist()
    assert all(g["image_uri"].startswith(f"{s3}/out/images/") and uris.exists(g["image_uri"]) for g in gens)
    # Credentials are never written or logged.
    assert SECRET not in json.dumps(manifest)
    assert SECRET not in caplog.text


def test_missing_s3_prefix_is_one_clear_line(s3):
    from raymem.sources import inspect_training

    with pytest.raises(InputError, match=rf"^{s3}/nothing-here: no .parquet files found$"):
        inspect_training(f"{s3}/nothing-here", {})
    with pytest.raises(InputError) as info:
        inspect_training("s3://no-such-bucket-xyz/train", {})
    assert "\n" not in str(info.value) and str(info.value).startswith("s3://no-such-bucket-xyz/train: ")


def _outage_config(s3, demo_root, out: str):
    from raymem.config import parse_config
    from tests.conftest import demo_raw_config

    raw = demo_raw_config(demo_root)
    prompts = (demo_root / "prompts.jsonl").read_text().splitlines()[:2]
    uris.write_bytes(f"{s3}/{out}-prompts.jsonl", ("\n".join(prompts) + "\n").encode())
    raw.update(prompts=f"{s3}/{out}-prompts.jsonl", output={"uri": f"{s3}/{out}", "scan_date": "2026-11-28"})
    raw["generation"].update(seeds_per_prompt=2, batch_size=1)
    raw["signals"]["null_seeds"] = 0
    return parse_config(raw)


def _stop_server_when(prefix: str, down_s: float | None):
    """Stop the S3 server once `prefix` has objects (units being written); restart it after `down_s`
    seconds on the same port (moto keeps its buckets in-process), or never when `down_s` is None."""
    import threading
    import time

    import boto3
    from moto.server import ThreadedMotoServer

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    stopped = threading.Event()

    def run():
        deadline = time.time() + 300
        while time.time() < deadline and not client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount"):
            time.sleep(0.05)
        SERVER["server"].stop()
        stopped.set()
        if down_s is not None:
            time.sleep(down_s)
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=SERVER["port"], verbose=False)
            server.start()
            SERVER["server"] = server

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, stopped


def test_an_s3_outage_of_seconds_mid_scan_is_retried_and_the_scan_completes(s3, demo_root):
    from raymem.pipeline import run_scan

    cfg = _outage_config(s3, demo_root, "outage-short")
    thread, stopped = _stop_server_when("outage-short/_units/", down_s=3.0)
    result = run_scan(cfg)
    thread.join()
    assert stopped.is_set()  # the server really went away mid-scan
    manifest = json.loads(uris.read_bytes(result.manifest_uri))
    assert manifest["status"] == "complete" and manifest["counts"]["units_ok"] == 4


def test_an_s3_outage_that_outlasts_the_retries_fails_in_one_line_and_is_recorded_locally(s3, demo_root, tmp_path):
    """In its own process and Ray, with two attempts per S3 request, so giving up takes seconds."""
    import subprocess
    import sys

    import yaml
    from moto.server import ThreadedMotoServer

    from tests.conftest import REPO

    cfg = _outage_config(s3, demo_root, "outage-long")
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAYMEM_S3_RETRIES": "2", "RAYMEM_STATE_DIR": str(tmp_path / "state"), "RAY_ADDRESS": ""}
    thread, stopped = _stop_server_when("outage-long/_units/", down_s=None)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "raymem.cli", "scan", str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=600,
        )
    finally:
        thread.join()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=SERVER["port"], verbose=False)
        server.start()  # back for the tests that follow
        SERVER["server"] = server
    assert stopped.is_set() and out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("raymem: error:")]
    assert len(errors) == 1 and "Could not connect" in errors[0], out.stderr[-2000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "state" / "failed").glob("*.json")]
    assert record["status"] == "failed" and record["root"] == f"{s3}/outage-long" and record["error"]
    assert SECRET not in out.stderr and SECRET not in json.dumps(record)


def test_an_output_root_in_a_missing_bucket_is_one_line_before_any_work(s3, demo_root):
    from raymem.config import parse_config
    from raymem.errors import OutputError
    from raymem.pipeline import run_scan
    from tests.conftest import demo_raw_config

    raw = demo_raw_config(demo_root)
    raw["output"] = {"uri": "s3://no-such-bucket-for-outputs/raymem", "scan_date": "2026-11-28"}
    with pytest.raises(OutputError) as info:
        run_scan(parse_config(raw))
    message = str(info.value)
    assert message.startswith("s3://no-such-bucket-for-outputs/raymem: cannot write the scan's outputs: ")
    assert "\n" not in message and SECRET not in message
