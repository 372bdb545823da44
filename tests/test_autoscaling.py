"""Scans against a real autoscaling Ray cluster on 127.0.0.1: a head with no GPU and an autoscaler whose
GPU node type starts on demand (Ray's fake multi-node provider: real raylets on this machine that
advertise one GPU each). A cold cluster must ask for GPUs, not settle for the head's CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.clusters import ray_head_on_loopback
from tests.conftest import demo_raw_config

pytestmark = pytest.mark.ray

GPU_GROUP = {"gpu-group": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}}
CPU_GROUP = {"cpu-group": {"resources": {"CPU": 2}, "max_workers": 1}}


def scan_config(demo_root, tmp_path, address: str, **resources) -> str:
    raw = demo_raw_config(demo_root)
    raw["output"] = {"uri": str(tmp_path / "out"), "scan_date": "2026-11-30"}
    raw["generation"]["seeds_per_prompt"] = 2
    raw["signals"]["null_seeds"] = 0
    raw["resources"] = {"cpus_per_actor": 1, **resources}
    raw["ray"] = {"address": address}
    path = tmp_path / "scan.yaml"
    path.write_text(json.dumps(raw))
    return str(path)


def raymem(*args: str, env: dict) -> subprocess.CompletedProcess:
    """The CLI in its own process, as an operator runs it: Ray's auth mode is read once per process, so
    the driver must start with the cluster's environment."""
    cmd = [str(Path(sys.executable).parent / "raymem"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def manifest(tmp_path) -> dict:
    return json.loads(next((tmp_path / "out" / "manifests").glob("*.json")).read_text())


def test_a_cold_cluster_gets_gpu_actors_from_its_autoscaler(demo_root, tmp_path):
    with ray_head_on_loopback(num_cpus=3, worker_types=GPU_GROUP) as head:
        config = scan_config(demo_root, tmp_path, head.address, generation_actors="1..2", gpu_wait_s=120)
        out = raymem("scan", config, env=head.env)
        assert out.returncode == 0, out.stderr[-3000:]
    m = manifest(tmp_path)
    assert m["status"] == "complete"
    used = m["counts"]["resources"]
    assert used["device"] == "cuda" and "joined after asking the autoscaler" in used["device_reason"]
    assert used["generate"] == {"actors": "1..2", "num_gpus": 1.0, "num_cpus": 1.0, "chunks_at_once": 2}
    gens = pads.dataset(str(tmp_path / "out" / "generations"), format="parquet", partitioning="hive").to_table()
    # Every unit ran in an actor Ray gave a GPU (the fake node's GPU 0); torch finds no CUDA behind it here.
    assert set(gens.column("cuda_visible_devices").to_pylist()) == {"0"}
    assert gens.num_rows == 12 and set(gens.column("status").to_pylist()) == {"ok"}


def test_a_cluster_that_can_never_have_a_gpu(demo_root, tmp_path):
    with ray_head_on_loopback(num_cpus=3, worker_types=CPU_GROUP) as head:
        env = {**head.env, "RAYMEM_AUTOSCALER_SETTLE_S": "8"}
        # device: cuda -> one line, exit 1, nothing published.
        strict = scan_config(demo_root, tmp_path, head.address, device="cuda", gpu_wait_s=120)
        out = raymem("-q", "scan", strict, env=env)
        assert out.returncode == 1, out.stderr[-3000:]
        err = out.stderr.strip().splitlines()
        assert err[-1].startswith("raymem: error: resources.device is cuda but the cluster's autoscaler launched")
        assert not (tmp_path / "out" / "labels").exists()
        # auto -> CPU, and the manifest says why.
        config = scan_config(demo_root, tmp_path, head.address, gpu_wait_s=120)
        out = raymem("scan", config, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    m = next(
        json.loads(p.read_text())
        for p in (tmp_path / "out" / "manifests").glob("*.json")
        if json.loads(p.read_text())["status"] == "complete"
    )
    used = m["counts"]["resources"]
    assert used["device"] == "cpu" and "launched no node for a GPU" in used["device_reason"]
    assert used["generate"]["num_gpus"] == 0.0
