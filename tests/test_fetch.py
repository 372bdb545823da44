"""raymem.fetch against real servers on 127.0.0.1: an HTTP server whose routes fail the ways the web
does, a moto S3 server, local files and WebDataset tar shards."""

from __future__ import annotations

import io
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from raymem.fetch import Fetcher, FetchLimits, public_uri
from tests.servers import ImageServer, free_port, moto_s3


def png_bytes(seed: int = 0, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i in range(24):
        (root / f"img{i}.png").write_bytes(png_bytes(i))
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i in range(3):
            data = png_bytes(100 + i)
            info = tarfile.TarInfo(f"sample{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def server(files):
    with ImageServer(files, stall_s=3.0) as srv:
        yield srv


FAST = FetchLimits(timeout_s=1.0, retries=2, backoff_s=0.05, max_bytes=1_000_000, per_host=4)


def fetch(uri, limits=FAST):
    return Fetcher(limits, threads=4).fetch(uri)


def test_an_image_over_http_is_fetched_and_checked(server, files):
    got = fetch(f"{server.url}/files/img0.png")
    assert got.status == "ok" and got.data == (files / "img0.png").read_bytes()
    assert got.error is None and got.attempts == 1 and len(got.sha256) == 64


@pytest.mark.parametrize(
    ("route", "status", "http_status"),
    [
        ("missing/img0.png", "not_found", 404),
        ("gone/img0.png", "not_found", 410),
        ("error/img0.png", "http_error", 500),
        ("html/img0.png", "not_image", 200),
        ("truncated/img0.png", "undecodable", None),
        ("huge/img0.png", "too_large", 200),
        ("stall/img0.png", "timeout", None),
        ("trickle/img0.png", "timeout", 200),
        ("redirect/img1.png", "ok", None),
        ("shard.tar#sample0.png", "unsupported", None),
    ],
)
def test_every_way_an_http_fetch_fails_gets_its_own_status(server, route, status, http_status):
    got = fetch(f"{server.url}/{route}")
    assert got.status == status, got.error
    if http_status is not None:
        assert got.http_status == http_status
    assert (got.data is not None) == (status == "ok")
    assert (got.error is None) == (status == "ok")


def test_server_errors_and_timeouts_are_retried_with_backoff_but_404_is_not(server):
    server.reset_counts()
    assert fetch(f"{server.url}/error/a.png").attempts == 3  # 1 + retries
    assert server.requests["/error/a.png"] == 3
    assert fetch(f"{server.url}/missing/a.png").attempts == 1
    flaky = fetch(f"{server.url}/flaky/img2.png")  # 503 once, then the image
    assert flaky.status == "ok" and flaky.attempts == 2


def test_a_refused_connection_is_unreachable_after_retries():
    got = fetch(f"http://127.0.0.1:{free_port()}/img.png")
    assert got.status == "unreachable" and got.attempts == 3


def test_size_and_pixel_limits(server):
    small = FetchLimits(timeout_s=1.0, retries=0, max_bytes=2048)
    assert fetch(f"{server.url}/files/img0.png", small).status == "too_large"  # a 48x48 noise PNG is ~7 kB
    few_pixels = FetchLimits(timeout_s=1.0, retries=0, max_pixels=1024)
    got = fetch(f"{server.url}/files/img0.png", few_pixels)
    assert got.status == "too_large" and "48x48" in got.error


def test_credentials_and_query_strings_never_reach_errors(server):
    secret = "X-Amz-Signature=deadbeefsecret"
    got = fetch(f"http://user:hunter2@127.0.0.1:{server.port}/missing/img0.png?{secret}")
    assert got.status == "not_found"
    assert "deadbeefsecret" not in got.error and "hunter2" not in got.error
    assert public_uri("https://u:p@host:8443/a/b.jpg?sig=1#frag") == "https://host:8443/a/b.jpg#frag"
    assert public_uri("s3://bucket/key.jpg") == "s3://bucket/key.jpg"


def test_concurrency_is_bounded_per_host(files):
    with ImageServer(files, delay_s=0.2) as slow:
        fetcher = Fetcher(FetchLimits(timeout_s=5.0, per_host=2), threads=12)
        got = fetcher.fetch_many([f"{slow.url}/files/img{i}.png" for i in range(12)])
        assert [g.status for g in got] == ["ok"] * 12
        assert slow.max_in_flight == 2


def test_local_files_and_tar_members(files):
    fetcher = Fetcher(FAST, threads=4)
    shard = str(files / "shard-000.tar")
    got = fetcher.fetch_many(
        [
            str(files / "img3.png"),
            f"file://{files / 'img4.png'}",
            str(files / "nope.png"),
            f"{shard}#sample1.png",
            f"{shard}#sample2.png",
            f"{shard}#sample9.png",
            str(files / "missing-shard.tar") + "#sample0.png",
            None,
            "ftp://example.org/img.png",
        ]
    )
    assert [g.status for g in got] == [
        "ok",
        "ok",
        "not_found",
        "ok",
        "ok",
        "not_found",
        "not_found",
        "no_uri",
        "unsupported",
    ]
    with tarfile.open(shard) as tar:
        assert got[3].data == tar.extractfile("sample1.png").read()


def test_s3_objects_and_tar_members_on_s3(files):
    import boto3

    with moto_s3("raymem-fetch") as bucket:
        s3 = boto3.client("s3")
        s3.put_object(Bucket="raymem-fetch", Key="imgs/a.png", Body=(files / "img5.png").read_bytes())
        s3.put_object(Bucket="raymem-fetch", Key="shards/000.tar", Body=(files / "shard-000.tar").read_bytes())
        got = Fetcher(FAST, threads=4).fetch_many(
            [f"{bucket}/imgs/a.png", f"{bucket}/imgs/none.png", f"{bucket}/shards/000.tar#sample0.png"]
        )
    assert [g.status for g in got] == ["ok", "not_found", "ok"]
    assert got[0].data == (files / "img5.png").read_bytes()


def test_fetch_many_keeps_order_and_is_thread_safe(server):
    uris_ = [f"{server.url}/files/img{i % 24}.png" for i in range(60)] + [
        f"{server.url}/missing/x{i}" for i in range(5)
    ]
    results = []

    def run():
        results.append(Fetcher(FAST, threads=8).fetch_many(uris_))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        assert [g.uri for g in got] == uris_
        assert [g.status for g in got] == ["ok"] * 60 + ["not_found"] * 5


def test_the_limits_are_the_configs_by_name_with_the_same_defaults():
    from raymem.config import CandidatesConfig

    assert FetchLimits.of(CandidatesConfig()) == FetchLimits()
    assert FetchLimits.of(CandidatesConfig(timeout_s=3.0, per_host=2)) == FetchLimits(timeout_s=3.0, per_host=2)
