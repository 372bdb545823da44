"""`raymem submit | status | logs | stop` against a real Ray head started by the test on 127.0.0.1
(own ports and temp dir; stopped by PID afterwards, never with `ray stop`)."""

import json
import shutil

import pytest
import yaml

from raymem.cli import main
from tests.clusters import free_ports, ray_head_on_loopback
from tests.conftest import REPO, demo_raw_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_head():
    with ray_head_on_loopback(num_cpus=3) as head:
        yield head.dashboard, head.env


@pytest.fixture
def project(demo_root, tmp_path):
    """A working dir as `raymem submit` uploads it: the package, jobs/, and the scan config inside."""
    work = tmp_path / "project"
    shutil.copytree(REPO / "raymem", work / "raymem", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "jobs", work / "jobs")
    raw = demo_raw_config(demo_root)
    raw["output"] = {"uri": str(tmp_path / "out"), "scan_date": "2026-11-28"}
    raw["generation"]["seeds_per_prompt"] = 2
    raw["signals"]["null_seeds"] = 0
    (work / "scan.yaml").write_text(yaml.safe_dump(raw))
    return work


def test_submit_runs_the_scan_as_a_ray_job(ray_head, project, tmp_path, capsys, monkeypatch):
    address, env = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    config = str(project / "scan.yaml")
    assert (
        main(["submit", config, "--address", address, "--working-dir", str(project), "--wait", "--timeout", "600"]) == 0
    ), capsys.readouterr()
    out = capsys.readouterr().out
    sid = out.split(":")[0]
    assert sid.startswith("raymem-") and sid.endswith("-20261128") and f"{sid}: SUCCEEDED" in out
    manifest = json.loads(next((tmp_path / "out" / "manifests").glob("*.json")).read_text())
    assert manifest["status"] == "complete"
    # A head without an autoscaler and without a GPU: CPU at once, and the manifest says why.
    used = manifest["counts"]["resources"]
    assert (
        used["device"] == "cpu"
        and used["device_reason"] == "the cluster has no GPU and no autoscaler that can add nodes"
    )
    assert len(list((tmp_path / "out" / "labels").rglob("*.parquet"))) == 1
    # Same config, same day: the nightly re-submit finds the job instead of running it twice.
    assert main(["submit", config, "--address", address, "--working-dir", str(project)]) == 0
    assert "already submitted" in capsys.readouterr().out
    assert main(["status", "--config", config, "--address", address]) == 0
    assert capsys.readouterr().out.strip() == f"{sid}: SUCCEEDED"
    assert main(["logs", sid, "--address", address]) == 0
    assert "units" in capsys.readouterr().out  # the scan's own summary, from the job driver
    assert main(["stop", sid, "--address", address]) == 0
    assert "not running" in capsys.readouterr().out


def test_failing_scan_marks_the_job_failed(ray_head, project, tmp_path, capsys, monkeypatch):
    address, _ = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    raw = yaml.safe_load((project / "scan.yaml").read_text())
    raw["name"] = "broken"
    raw["training"]["embeddings"] = str(tmp_path / "no-training-here")
    (project / "broken.yaml").write_text(yaml.safe_dump(raw))
    assert (
        main(
            [
                "submit",
                str(project / "broken.yaml"),
                "--address",
                address,
                "--working-dir",
                str(project),
                "--wait",
                "--timeout",
                "300",
            ]
        )
        == 1
    )
    assert ": FAILED" in capsys.readouterr().out


def test_bad_addresses_and_ids_are_one_line(ray_head, capsys, monkeypatch):
    address, _ = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert main(["status", "raymem-nope-20260101", "--address", address]) == 1
    assert capsys.readouterr().err.strip() == "raymem: error: no job 'raymem-nope-20260101' on this Ray cluster"
    (port,) = free_ports(1)
    assert main(["status", "x", "--address", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"raymem: error: cannot reach the Ray job server at http://127.0.0.1:{port}") and "\n" not in err
    )
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["status", "x"]) == 1
    assert "no Ray address" in capsys.readouterr().err


def test_a_failed_nightly_is_retried_as_a_new_attempt_and_listed(ray_head, project, tmp_path, capsys, monkeypatch):
    address, _ = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    raw = yaml.safe_load((project / "scan.yaml").read_text())
    demo_training = raw["training"]["embeddings"]
    raw["name"] = "nightly"
    arrives_later = tmp_path / "training-arrives-later"
    raw["training"]["embeddings"] = str(arrives_later)
    (project / "nightly.yaml").write_text(yaml.safe_dump(raw))
    args = ["submit", str(project / "nightly.yaml"), "--address", address, "--working-dir", str(project)]
    assert main([*args, "--wait", "--timeout", "300"]) == 1  # the alert: a non-zero exit
    first = capsys.readouterr().out
    sid = first.split(":")[0]
    assert f"{sid}: FAILED" in first
    # The same day without --retry finds the failed job and says how to retry it.
    assert main(args) == 0
    assert "FAILED; not run twice; submit with --retry" in capsys.readouterr().out
    # The training data arrives; the retry is a new attempt, its logs streamed while waiting.
    shutil.copytree(demo_training, arrives_later)
    assert main([*args, "--retry", "--wait", "--timeout", "600"]) == 0
    out = capsys.readouterr().out
    assert f"{sid}-r1: submitted (a new attempt" in out and f"{sid}-r1: SUCCEEDED" in out
    assert "units" in out  # the job driver's own lines, tailed as they came
    # A retry after success runs nothing.
    assert main([*args, "--retry"]) == 0
    assert f"{sid}-r1: already submitted (same config and date), SUCCEEDED" in capsys.readouterr().out
    assert main(["list", "--address", address]) == 0
    listing = capsys.readouterr().out
    assert f"{sid} " in listing and f"{sid}-r1 " in listing and "nightly" in listing
    assert "FAILED" in listing and "SUCCEEDED" in listing


def test_attempts_of_a_scan_and_day_are_found_in_order():
    from raymem.submit import attempts

    class Job:
        def __init__(self, sid):
            self.submission_id = sid

    class Jobs:
        def list_jobs(self):
            ids = [
                "raymem-a-1-r2",
                "raymem-a-1",
                "raymem-a-1-r10",
                "raymem-a-1-rx",
                "raymem-a-12",
                None,
                "raymem-a-1-r1",
            ]
            return [Job(i) for i in ids]

    found = [j.submission_id for j in attempts(Jobs(), "raymem-a-1")]
    assert found == ["raymem-a-1", "raymem-a-1-r1", "raymem-a-1-r2", "raymem-a-1-r10"]
