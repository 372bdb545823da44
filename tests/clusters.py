"""Real Ray clusters on 127.0.0.1 for tests: a `ray start --head` with its own ports and temp dir, with
or without an autoscaler whose worker nodes are Ray's fake multi-node provider (real raylets on this
machine that advertise the GPUs the node type declares). Stopped by PID, never with `ray stop`, which
would stop every Ray on a shared machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil


def free_ports(n: int, avoid: range = range(0)) -> list[int]:
    """`n` distinct free ports on loopback, none inside `avoid`."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)  # held open until all are picked, so the OS never hands out one twice
        if s.getsockname()[1] not in avoid:
            ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def worker_port_block(width: int = 200) -> range:
    """A block of `width` ports with nothing listening, for Ray's worker range."""
    for _ in range(100):
        (start,) = free_ports(1)
        block = range(start, start + width + 1)
        if block.stop <= 65535 and all(_bindable(p) for p in block):
            return block
    raise RuntimeError("no free block of worker ports on 127.0.0.1")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def kill_tree_matching(marker: str) -> None:
    """Stop every process whose command line mentions `marker` (this head's temp dir or port)."""
    procs = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                # Children too: Ray renames its agents (ray::DashboardAgent) so only their parents match.
                for q in [p, *p.children(recursive=True)]:
                    procs[q.pid] = q
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    procs = list(procs.values())
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:<port>, for the job client
    address: str  # 127.0.0.1:<gcs port>, for ray.init
    env: dict


# Ray's fake multi-node provider, loaded as an "external" provider: the wheel lacks the defaults file
# that `type: fake_multinode` reads (so ray.cluster_utils.AutoscalingCluster cannot start here), and
# AutoscalingCluster runs `ray stop --force`, which must never run on a shared machine.
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


def autoscaling_config(gcs: str, head_cpus: float, worker_types: dict) -> dict:
    """An autoscaler config whose worker node types start as fake nodes on this machine."""
    return {
        "cluster_name": "raymem-test",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "external",
            "module": FAKE_PROVIDER,
            "gcs_address": gcs,
            "head_node_id": FAKE_HEAD_ID,
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
            "use_node_id_as_ip": True,
        },
        "auth": {"ssh_user": "raymem"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, "min_workers": 0, **t} for name, t in worker_types.items()},
        },
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
    }


@contextlib.contextmanager
def ray_head_on_loopback(num_cpus: float, worker_types: dict | None = None):
    """A Ray head on 127.0.0.1 (own ports, own temp dir); with `worker_types`, an autoscaler that adds
    fake worker nodes of those types on demand."""
    temp = Path(f"/tmp/rmh-{os.getpid()}-{free_ports(1)[0]}")  # short: Ray's unix sockets live under it
    temp.mkdir(parents=True)
    # Ray rejects a component port inside the worker range, so pick the range first and the rest outside it.
    workers = worker_port_block()
    gcs, dash, agent, agent_grpc, renv, metrics, node, objm, client = free_ports(9, avoid=workers)
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={renv}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node}",
        f"--object-manager-port={objm}",
        f"--ray-client-server-port={client}",
        f"--min-worker-port={workers.start}",
        f"--max-worker-port={workers.stop - 1}",
        f"--num-cpus={num_cpus:g}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    if worker_types:
        config = temp / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(f"127.0.0.1:{gcs}", num_cpus, worker_types)))
        cmd.append(f"--autoscaling-config={config}")
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        yield Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", env)
    finally:
        # The autoscaler's fake worker nodes are children of its monitor, so the temp dir finds them too.
        kill_tree_matching(str(temp))
        kill_tree_matching(f"--ray-client-server-port={client}")
        kill_tree_matching(f"127.0.0.1:{gcs}")
        shutil.rmtree(temp, ignore_errors=True)
