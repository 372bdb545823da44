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
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def upload(local: Path, uri: str) -> None:
    fs, path = uris.filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_index_and_scan_entirely_on_s3(s3, demo_root, tmp_path, caplog):
    from raymem.config import IndexConfig, parse_config
    from raymem.index import run_index
    from raymem.scan import run_scan
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
